"""Export: merged Hugging Face folders (hf) and ONNX/TorchScript graphs (onnx). Serving (HTTP API, DIMSE listener,
study pipeline, DICOM SR, DICOMweb) lives in :mod:`medmm.serve`."""
