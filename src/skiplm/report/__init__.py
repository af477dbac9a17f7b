"""Results: JSON / markdown files, plots and the offline HTML report."""
