"""Running Triton: the embedded CPU server, its Python handle, the client, and GPU/Kubernetes manifests."""
