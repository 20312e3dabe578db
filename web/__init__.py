"""The web page for one smear at a time: FastAPI over the batch job's field function."""
