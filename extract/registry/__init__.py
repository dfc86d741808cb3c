"""What can be named: backbones and their weights, datasets, and reading image files."""
