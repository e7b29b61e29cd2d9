"""Export: merged Hugging Face folders (and, in later issues, ONNX/TorchScript, DICOM SR, PACS clients)."""
