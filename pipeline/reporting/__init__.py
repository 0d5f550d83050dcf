"""Reports: figures and HTML pages, drawn only from the results that lower layers return."""
