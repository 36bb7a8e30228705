"""Shared fixtures. Expensive things (a Ray instance, a DeepSpeed build, an S3
server) are session-scoped so tests share them."""

import os

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
