"""Recipe configs (ml_collections): pass one to a trainer with --config=configs/<name>.py."""
