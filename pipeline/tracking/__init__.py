"""MLflow: the run of each training, and one parent run per sweep."""
