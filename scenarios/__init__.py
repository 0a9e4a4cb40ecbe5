"""Ready-to-run scenario files (installed as the package ``fedsim.scenarios``)."""
