"""Export and deployment: merged Hugging Face folders (hf), ONNX/TorchScript graphs (onnx), the study -> DICOM SR
chain (study, dicom_sr), DICOMweb pull-run-push (dicomweb), the DIMSE listener (listener) and the HTTP API (http)."""
