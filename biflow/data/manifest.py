"""The manifest of a shard set (``manifest.json`` at the root, written last):
what the training code reads to find shards, classes and image shape."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from biflow.data import storage
from biflow.data.sources import FASHION_MNIST_DIR
from biflow.errors import UserError

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    """A committed shard set. ``data`` is the JSON document; ``uri`` its root."""

    data: dict[str, Any]
    uri: str = ""

    @property
    def kind(self) -> str:
        return self.data.get("kind", "pixels")

    @property
    def classes(self) -> list[str]:
        return self.data["classes"]

    @property
    def class_names(self) -> list[str]:
        return self.data.get("class_names") or self.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int | None:
        """Stored side length; None when images kept their source sizes."""
        return self.data.get("image_size")

    @property
    def channels(self) -> int:
        return self.data["channels"]

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def split(self, name: str) -> dict[str, Any]:
        if name not in self.data["splits"]:
            raise UserError(f"split {name!r} not in the dataset at {self.uri}; available: {', '.join(self.splits)}")
        return self.data["splits"][name]

    def records(self, split: str) -> int:
        return self.split(split)["records"]

    def shard_paths(self, split: str) -> list[str]:
        """Shard paths relative to the root, in manifest order."""
        return [s["path"] for s in self.split(split)["shards"]]


def read_manifest(uri: str, endpoint: str = "", region: str = "") -> Manifest:
    """Load the manifest at ``uri``; a clear ``UserError`` when there is none."""
    fs, root = storage.resolve(uri, endpoint, region)
    path = storage.join(root, MANIFEST)
    try:
        raw = storage.read_bytes(fs, path)
    except FileNotFoundError:
        raise UserError(f"no {MANIFEST} under {uri}: prepare the data first, e.g. "
                        f"`biflow prepare-data {FASHION_MNIST_DIR} {uri} --format fashion-mnist` "
                        "(a conversion that did not finish leaves no manifest)") from None
    except OSError as exc:
        raise UserError(f"cannot read {MANIFEST} under {uri}: {storage.clean_error(exc)}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{uri}/{MANIFEST} is not valid JSON: {exc}") from None
    return Manifest(data, uri)


def _try_read_manifest(fs, root: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(fs, storage.join(root, MANIFEST)))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
