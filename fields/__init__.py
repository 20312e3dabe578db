"""One smear field start to finish (decode, cells, crops), shared by the served field model, the page and the job."""
