"""The batch job: whole smear images -> cells -> Triton -> per-cell results and per-slide parasitemia.

Never imports TensorFlow: workers need only numpy, pillow, scikit-image and the Triton client.
"""
