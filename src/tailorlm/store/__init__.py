"""Where users' modules live: ``module_folder`` (one module's files) and ``store`` (a user's module by id)."""
