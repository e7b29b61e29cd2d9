"""Raw inputs -> arrays + metadata, with typed errors: DICOM, PNG/JPEG, SMILES, DNA/FASTA."""
