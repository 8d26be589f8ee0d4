"""What a volume asks for: attributes parsed into a CertificateSpec, templates, durations."""
