"""smearscope: malaria smear screening at archive scale (train, export, serve, batch)."""
