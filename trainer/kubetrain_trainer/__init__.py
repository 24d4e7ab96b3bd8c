"""kubetrain data plane."""
