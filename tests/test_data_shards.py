"""prepare-data on Ray Data against a real S3 server (moto): ImageNet layout with
bad files, Fashion-MNIST, exact round trips, idempotent reruns."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from biflow.data import storage
from biflow.data.shards import prepare_data, read_manifest, verify_shards
from biflow.errors import UserError

pytestmark = pytest.mark.integration


WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
PER_CLASS = 6


def _jpeg(rng, w, h) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    """ILSVRC layout: train/<wnid>/*.JPEG (+ bad files, an empty class folder),
    flat val/ with LOC_val_solution.csv, LOC_synset_mapping.txt."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    expected = {}
    for c, wnid in enumerate(WNIDS):
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for i in range(PER_CLASS):
            name = f"{wnid}_{i}.JPEG"
            (d / name).write_bytes(_jpeg(rng, 40 + 7 * i, 30 + 5 * c))
            expected[f"train/{wnid}/{name}"] = c
    good = _jpeg(rng, 48, 48)
    (root / "train" / WNIDS[0] / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "train" / WNIDS[1] / "garbage.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
    (root / "train" / WNIDS[2] / "README.txt").write_text("not an image")
    (root / "train" / WNIDS[3] / "empty.JPEG").write_bytes(b"")
    (root / "train" / "n09999999").mkdir()  # empty class folder
    (root / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for i in range(8):
        wnid = WNIDS[i % 4]
        (root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(_jpeg(rng, 50, 40))
        lines.append(f"ILSVRC2012_val_{i:08d},{wnid} 1 2 3 4")
        expected[f"val/{wnid}/ILSVRC2012_val_{i:08d}.JPEG"] = WNIDS.index(wnid)
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (root / "LOC_synset_mapping.txt").write_text(
        "\n".join(f"{w} name {i}, other" for i, w in enumerate(WNIDS + ["n09999999"])) + "\n")
    return root, expected


def _read_rows(uri: str, endpoint: str, split: str) -> list[dict]:
    manifest = read_manifest(uri, endpoint)
    fs, root = storage.resolve(uri, endpoint)
    rows = []
    for rel in manifest.shard_paths(split):
        with fs.open_input_file(storage.join(root, rel)) as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def _objects(s3_server, bucket: str) -> list[str]:
    """Object keys, without the empty directory markers pyarrow leaves on S3."""
    return sorted(o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
                  if not o["Key"].endswith("/"))


def test_imagenet_to_s3_with_bad_files(imagenet_tree, s3_server, ray_local):
    root, expected = imagenet_tree
    bucket = s3_server.make_bucket("shards-imagenet")
    uri = f"s3://{bucket}/imagenet32"
    m = prepare_data(str(root), uri, "imagenet", image_size=32, endpoint=s3_server.endpoint, progress=False)

    assert m.classes == sorted(WNIDS + ["n09999999"]) and m.num_classes == 5
    assert m.class_names[0] == "name 0, other"
    assert (m.image_size, m.channels, m.data["encoding"]) == (32, 3, "jpeg")
    assert m.records("train") == len(WNIDS) * PER_CLASS == 24 and m.records("val") == 8
    train = m.split("train")
    reasons = {s["key"]: s["reason"] for s in train["skipped"]}
    assert train["num_skipped"] == 5 and len(reasons) == 5
    assert reasons["train/n09999999/"] == "empty class folder"
    assert reasons[f"train/{WNIDS[0]}/truncated.JPEG"].startswith("corrupt or truncated")
    assert reasons[f"train/{WNIDS[1]}/garbage.JPEG"].startswith(("corrupt or truncated", "not an image"))
    assert reasons[f"train/{WNIDS[2]}/README.txt"] == "not an image"
    assert reasons[f"train/{WNIDS[3]}/empty.JPEG"] == "empty file"

    # exact round trip: every good key once, with its label; 32x32 RGB JPEGs
    rows = _read_rows(uri, s3_server.endpoint, "train") + _read_rows(uri, s3_server.endpoint, "val")
    assert {r["key"]: r["label"] for r in rows} == expected and len(rows) == len(expected)
    img = Image.open(io.BytesIO(rows[0]["image"]))
    assert (img.format, img.size, img.mode) == ("JPEG", (32, 32), "RGB")
    # manifest sizes and checksums match the objects; manifest is plain JSON without credentials
    assert verify_shards(m, s3_server.endpoint) == []
    body = s3_server.client().get_object(Bucket=bucket, Key="imagenet32/manifest.json")["Body"].read().decode()
    assert s3_server.secret_key not in body and s3_server.access_key not in body
    assert json.loads(body)["splits"]["train"]["records"] == 24

    # rerun: a no-op; --force rewrites the same names; other options replace the shards
    keys_before = _objects(s3_server, bucket)
    again = prepare_data(str(root), uri, "imagenet", image_size=32, endpoint=s3_server.endpoint, progress=False)
    assert again.data == m.data
    forced = prepare_data(str(root), uri, "imagenet", image_size=32, endpoint=s3_server.endpoint,
                          progress=False, force=True)
    keys_after = _objects(s3_server, bucket)
    assert keys_after == keys_before
    assert [s["sha256"] for s in forced.split("train")["shards"]] == [s["sha256"] for s in train["shards"]]
    other = prepare_data(str(root), uri, "imagenet", image_size=16, endpoint=s3_server.endpoint, progress=False)
    keys_other = _objects(s3_server, bucket)
    assert other.data["fingerprint"] != m.data["fingerprint"] and len(keys_other) == len(keys_before)
    assert not set(keys_other) & (set(keys_before) - {"imagenet32/manifest.json"})  # old shards removed after commit
    assert other.records("train") == 24


def test_fashion_mnist_exact_roundtrip(fashion_mnist_dir, tmp_path, ray_local):
    out = tmp_path / "fm"
    m = prepare_data(str(fashion_mnist_dir), str(out), "fashion-mnist", limit=2000, progress=False)
    assert m.records("train") == 2000 and m.records("test") == 2000
    assert len(m.shard_paths("train")) == 7  # min(8 shards, 2000 // 256)
    assert (m.image_size, m.channels, m.data["encoding"], m.num_classes) == (28, 1, "png", 10)
    assert m.class_names[9] == "Ankle boot"
    with gzip.open(fashion_mnist_dir / "train-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(fashion_mnist_dir / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    rows = _read_rows(str(out), "", "train")
    idx = np.array([int(r["key"].split("/")[1]) for r in rows])
    assert len(set(idx.tolist())) == 2000
    assert np.array_equal([r["label"] for r in rows], labels[idx])
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(r["image"]))) for r in rows])
    assert np.array_equal(decoded, pixels[idx])  # PNG: lossless
    counts = np.bincount([r["label"] for r in rows], minlength=10)
    assert counts.min() > 150  # shuffled before the limit: every class present


def test_empty_or_missing_source(tmp_path, ray_local):
    (tmp_path / "src" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        prepare_data(str(tmp_path / "src"), str(tmp_path / "out"), "folder", progress=False)
    with pytest.raises(UserError, match="does not exist"):
        prepare_data(str(tmp_path / "nope"), str(tmp_path / "out"), "folder", progress=False)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        prepare_data(str(tmp_path / "src"), str(tmp_path / "out"), "fashion-mnist", progress=False)
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_prepare_data_folder(imagenet_tree, tmp_path, ray_local):
    from typer.testing import CliRunner

    from biflow.cli import app

    root, _ = imagenet_tree
    out = tmp_path / "folder-shards"
    res = CliRunner().invoke(app, ["prepare-data", str(root / "train"), str(out), "--format", "folder",
                                   "--image-size", "24", "--split", "train"])
    assert res.exit_code == 0, res.output
    m = read_manifest(str(out))
    assert m.data["source"]["format"] == "folder"
    assert m.records("train") == 24 and m.split("train")["num_skipped"] == 5 and m.image_size == 24


def test_cli_prepare_data_takes_source_then_out_or_out_alone(tmp_path, ray_local):
    """`prepare-data OUT` where the format implies the source (Fashion-MNIST's Debian folder), the same
    as `SOURCE OUT`, `--source SOURCE OUT` and the older `"" OUT`; a format without one says so."""
    from typer.testing import CliRunner

    from biflow.cli import app
    from biflow.data.sources import FASHION_MNIST_DIR

    if not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian dataset-fashion-mnist is not installed (make dataset)")
    opts = ["--format", "fashion-mnist", "--split", "test", "--limit", "300", "--min-shards", "1"]
    forms = {"out alone": [], "source out": [FASHION_MNIST_DIR], "older form": [""]}
    manifests = {}
    for name, before in forms.items():
        out = tmp_path / name.replace(" ", "-")
        res = CliRunner().invoke(app, ["prepare-data", *before, str(out), *opts])
        assert res.exit_code == 0, res.output
        manifests[name] = read_manifest(str(out))
    res = CliRunner().invoke(app, ["prepare-data", str(tmp_path / "opt"), "--source", FASHION_MNIST_DIR, *opts])
    assert res.exit_code == 0, res.output
    manifests["--source"] = read_manifest(str(tmp_path / "opt"))
    assert {m.records("test") for m in manifests.values()} == {300}
    assert len({m.data["source"]["path"] for m in manifests.values()}) == 1
    for args, message in [
        ([str(tmp_path / "x"), "--format", "folder"], "--format folder needs the source folder: `biflow prepare-data "
                                                      "SOURCE OUT --format folder`"),
        (["a", "b", "c", "--format", "folder"], "prepare-data takes SOURCE OUT (or OUT alone), got 3 paths: a b c"),
        (["a", "b", "--source", "c", "--format", "folder"], "two sources: 'a' (argument) and --source 'c'; give one"),
    ]:
        res = CliRunner().invoke(app, ["prepare-data", *args])
        assert res.exit_code == 2 and message in res.output, res.output


def test_failed_run_keeps_previous_data(imagenet_tree, tmp_path, ray_local):
    root, _ = imagenet_tree
    out = str(tmp_path / "keep")
    good = prepare_data(str(root / "train"), out, "folder", image_size=16, progress=False)
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "a.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="no readable images"):
        prepare_data(str(tmp_path / "bad"), out, "folder", progress=False)
    assert read_manifest(out).data == good.data and verify_shards(good) == []
