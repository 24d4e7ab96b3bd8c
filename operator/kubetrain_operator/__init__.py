"""kubetrain control plane."""
