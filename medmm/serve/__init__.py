"""Serving beside a PACS: the study -> DICOM SR chain (study, dicom_sr), DICOMweb pull-run-push (dicomweb), the DIMSE
listener (listener) and the HTTP API (http). ``SECURITY.md`` says what each server trusts."""
