"""Tar shards: `maelab shards make` keeps labels and classes and never leaves a half shard that looks
complete; the stream covers every sample exactly once per epoch over ranks x loader workers, augments
as the folder path does, resumes mid-epoch exactly, and fails with one line naming the shard."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maelab.choices import SHARD_MANIFEST
from maelab.cli import main
from maelab.commands.pretrain import PretrainConfig
from maelab.commands.pretrain import run as run_pretrain
from maelab.config import build_config
from maelab.data import shards as sh
from maelab.data.folders import open_rgb, scan_images
from maelab.data.seeding import mix_seed
from maelab.data.transforms import PretrainTransform
from maelab.errors import MaelabError, SameOnEveryRank
from maelab.io import read_weights
from maelab.train import checkpoint as ckpt
from maelab.train.loop import RunInterrupted
from maelab.train.tasks import PretrainTask

SIZE = (16, 16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """39 small PNGs in 3 class folders (13 each)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(13):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def shard_dir(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "set"
    assert main(["shards", "make", "--data", str(folder), "--out", str(out), "--shard-size", "5"]) == 0
    return out


def plan(shards, world=1, rank=0, workers=0, batch=4, accum=1):
    return sh.ShardPlan(shards, batch, accum, world, rank, seed=1, num_workers=workers)


def feeder(shards, **kw):
    return sh.ShardFeeder(plan(shards, **kw), torch.device("cpu"), PretrainTransform(SIZE), buffer=7)


def test_make_keeps_labels_classes_and_counts_in_the_manifest(folder, shard_dir):
    manifest = json.loads((shard_dir / SHARD_MANIFEST).read_text())
    assert manifest["classes"] == ["c0", "c1", "c2"] and manifest["total"] == 39
    assert [s["count"] for s in manifest["shards"]] == [5] * 7 + [4]
    images = scan_images(folder)
    by_path = dict(zip((str(Path(p).relative_to(folder)) for p in images.paths), images.labels))
    seen = {}
    for s in manifest["shards"]:
        with tarfile.open(shard_dir / s["name"]) as tar:
            names = tar.getnames()
            for n in names:
                if n.endswith(".src.txt"):
                    key = n.split(".")[0]
                    seen[tar.extractfile(n).read().decode()] = int(tar.extractfile(f"{key}.cls").read())
    assert seen == by_path  # every image once, with its label


def test_a_killed_make_leaves_no_shard_set_and_a_rerun_completes(folder, tmp_path, monkeypatch):
    out = tmp_path / "set"
    real = Path.read_bytes
    calls = {"n": 0}

    def dies(self):
        calls["n"] += 1
        if calls["n"] == 8:  # inside the second shard
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", dies)
    with pytest.raises(KeyboardInterrupt):
        sh.make_shards(scan_images(folder), out, 5, progress=False)
    monkeypatch.setattr(Path, "read_bytes", real)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-0000.tar"]  # the half shard is a temp file
    assert not (out / SHARD_MANIFEST).exists()
    with pytest.raises(MaelabError, match="did not finish"):
        sh.open_shards(str(out))
    sh.make_shards(scan_images(folder), out, 5, progress=False)
    assert sh.open_shards(str(out)).total == 39 and not list(out.glob("*tmp*"))


def test_a_rerun_with_fewer_shards_names_the_killed_runs_extra_ones(folder, tmp_path):
    """A killed run of 8 shards, then a complete one of 2: the 6 extra tars stayed beside the new set without a
    word, and a pattern over the folder read their images twice."""
    out = tmp_path / "set"
    sh.make_shards(scan_images(folder), out, 5, progress=False)
    (out / SHARD_MANIFEST).unlink()  # as if killed before its manifest
    with pytest.warns(UserWarning, match=r"also holds 6 shard\(s\) this set does not list \(train-0002.tar"):
        sh.make_shards(scan_images(folder), out, 20, progress=False)
    assert sh.open_shards(str(out)).total == 39  # the manifest lists the new 2; nothing is deleted
    assert len(list(out.glob("train-*.tar"))) == 8


def test_two_ranks_times_two_workers_read_every_sample_exactly_once(shard_dir):
    shards = sh.open_shards(str(shard_dir))
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            f = feeder(shards, world=2, rank=rank, workers=2)
            f.stream.set_position(epoch, [])
            seen += [int(i) for *_, idx in f.loader for i in idx]
        assert sorted(seen) == list(range(39)), epoch
    # each rank trains the same number of steps: min(20, 19) // 4
    assert plan(shards, world=2, rank=0).steps_per_epoch == plan(shards, world=2, rank=1).steps_per_epoch == 4


def test_samples_get_the_folder_paths_decoder_and_augmentation(folder, shard_dir):
    shards = sh.open_shards(str(shard_dir))
    f = feeder(shards, workers=2)
    f.stream.set_position(3, [])
    src = {}
    for url in shards.urls:
        with tarfile.open(url) as tar:
            for n in tar.getnames():
                if n.endswith(".src.txt"):
                    src[int(n.split(".")[0])] = folder / tar.extractfile(n).read().decode()
    t = PretrainTransform(SIZE)
    for _, images, _, indices in f.loader:
        for img, i in zip(images, indices.tolist()):
            g = torch.Generator().manual_seed(mix_seed(1, 2, 3, i))
            assert torch.equal(img, t(open_rgb(src[i]), g))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_exactly_the_rest_of_the_epoch(shard_dir, workers):
    shards = sh.open_shards(str(shard_dir))
    f = feeder(shards, workers=workers, batch=3, accum=2)
    whole = list(f.epoch(2))
    rest = list(f.epoch(2, start_step=2))
    assert len(whole) == f.steps_per_epoch * 2 and len(rest) == len(whole) - 4
    for a, b in zip(whole[4:], rest):
        assert (a.step, a.micro) == (b.step, b.micro) and torch.equal(a.images, b.images)
    assert not torch.equal(whole[0].images, list(f.epoch(3))[0].images)  # another epoch, another order


def test_patterns_and_pipe_commands_read_the_same_shards(shard_dir):
    pattern = sh.open_shards(str(shard_dir / "train-{0000..0007}.tar"))
    assert pattern.total == 39 and pattern.classes == ["c0", "c1", "c2"]  # the manifest beside them
    piped = sh.open_shards(f"pipe:cat {shard_dir}/train-{{0000..0002}}.tar")
    assert piped.counts == [5, 5, 5]  # no manifest beside a pipe: counted
    assert sh.is_shard_source(str(shard_dir)) and not sh.is_shard_source(str(shard_dir.parent))


def test_more_processes_than_shards_is_refused_up_front(shard_dir):
    shards = sh.open_shards(str(shard_dir / "train-{0000..0001}.tar"))
    with pytest.raises(SameOnEveryRank, match="3 processes but only 2 shard"):
        plan(shards, world=3)


def test_an_unreadable_shard_is_named_with_its_error(shard_dir, tmp_path):
    with pytest.raises(MaelabError, match=r"cannot read shard .*nowhere/train-0000.tar"):
        sh.open_shards(str(tmp_path / "nowhere" / "train-{0000..0001}.tar"))
    with pytest.raises(MaelabError, match="cannot read shard pipe:exit 3: the command `exit 3` exited with status 3"):
        sh.count_samples("pipe:exit 3")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("train-0000.tar", SHARD_MANIFEST):
        (broken / name).write_bytes((shard_dir / name).read_bytes())
    (broken / "train-0000.tar").write_bytes((shard_dir / "train-0000.tar").read_bytes()[:1500])  # truncated
    shards = sh.ShardSet("x", [str(broken / "train-0000.tar")], [5])
    with pytest.raises(MaelabError, match=r"cannot read shard .*train-0000.tar"):
        list(sh.read_samples(shards.urls[0]))


def _with_bad_sample(shard_dir: Path, dest: Path) -> Path:
    """A copy of shard 0 whose second image is not an image."""
    dest.mkdir()
    out = io.BytesIO()
    with tarfile.open(shard_dir / "train-0000.tar") as src, tarfile.open(fileobj=out, mode="w") as tar:
        members = src.getmembers()
        bad = sorted({m.name.split(".")[0] for m in members})[1]
        for m in members:
            data = src.extractfile(m).read()
            if m.name == f"{bad}.png":
                data = b"not a png"
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    (dest / "train-0000.tar").write_bytes(out.getvalue())
    return dest / "train-0000.tar"


def test_a_corrupt_sample_follows_the_bad_files_policy(shard_dir, tmp_path):
    url = _with_bad_sample(shard_dir, tmp_path / "bad")
    shards = sh.ShardSet("x", [str(url)], [5])
    f = sh.ShardFeeder(plan(shards, batch=5), torch.device("cpu"), PretrainTransform(SIZE))
    with pytest.raises(MaelabError, match=r"cannot read image .*train-0000.tar#\d+\.png: not an image PIL can "
                                          r"identify .*--bad-files skip") as refused:
        list(f.epoch(0))
    assert "BytesIO" not in str(refused.value)  # PIL names the file object the sample was read from
    f = sh.ShardFeeder(plan(shards, batch=5), torch.device("cpu"), PretrainTransform(SIZE), bad_files="skip")
    with pytest.warns(UserWarning, match="replacing unreadable sample"):
        (batch,) = list(f.epoch(0))
    assert batch.images.shape == (5, 3, *SIZE) and torch.isfinite(batch.images).all()


def test_pretrain_streams_shards_and_resumes_exactly(shard_dir, tmp_path, monkeypatch):

    def cfg(out):
        return build_config(PretrainConfig, dict(
            data=str(shard_dir), out=str(out), model="mae_vit_tiny_patch4", decoder_depth=1, img_size=[16],
            batch_size=4, epochs=2, warmup_epochs=0, vis_every=0, log_every=1, device="cpu", num_workers=2,
            seed=3, shuffle_buffer=7))

    run_pretrain(cfg(tmp_path / "ref"))
    original = PretrainTask.forward

    def forward(self, runner, batch):
        if batch.epoch == 1 and batch.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, runner, batch)

    monkeypatch.setattr(PretrainTask, "forward", forward)
    with pytest.raises(RunInterrupted):
        run_pretrain(cfg(tmp_path / "run"))
    monkeypatch.setattr(PretrainTask, "forward", original)
    run_pretrain(cfg(tmp_path / "run"))
    a, b = (read_weights(ckpt.latest_checkpoint(d) / ckpt.WEIGHTS)[0] for d in (tmp_path / "ref", tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((ckpt.latest_checkpoint(tmp_path / "run") / ckpt.META).read_text())[sh.STREAM_WORKERS] == 2
    assert (tmp_path / "run" / "reconstruction.png").is_file()
    # visualize finds the run's own (shard) images
    assert main(["visualize", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "v.png")]) == 0
    assert (tmp_path / "v.png").is_file()


def test_a_resumed_stream_keeps_the_worker_count_it_started_with(tmp_path, capsys):
    """The order of streamed samples depends on the loader worker count, and -1 means one per core: a
    resume on a machine with other cores keeps the recorded count; an explicit other count warns."""
    from maelab.commands.pretrain import stream_workers

    checkpoint = tmp_path / "step_00000019"
    checkpoint.mkdir()
    (checkpoint / ckpt.META).write_text(json.dumps({sh.STREAM_WORKERS: 1}))
    assert stream_workers(-1, 2, checkpoint, True) == 1
    assert "1 loader workers, as when the run started" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="--num-workers 2 differs from the 1 this run started with"):
        assert stream_workers(2, 2, checkpoint, True) == 2
    assert stream_workers(-1, 2, None, True) == 2 and stream_workers(-1, 1, checkpoint, True) == 1
    (checkpoint / ckpt.META).write_text(json.dumps({}))  # a checkpoint from before the record
    assert stream_workers(-1, 2, checkpoint, True) == 2


@pytest.fixture(scope="module")
def split_shards(folder, tmp_path_factory) -> Path:
    """``train`` / ``val`` shard sets: the same 39 images twice (the evaluation commands need both)."""
    root = tmp_path_factory.mktemp("split_shards")
    for split in ("train", "val"):
        assert main(["shards", "make", "--data", str(folder), "--out", str(root / split), "--shard-size", "10"]) == 0
    return root


def test_local_shards_read_by_index_give_the_folder_images_and_labels(folder, split_shards):
    images = sh.shard_images(str(split_shards / "train"))
    assert images.classes == ["c0", "c1", "c2"] and len(images) == 39
    with tarfile.open(split_shards / "train" / "train-0000.tar") as tar:
        src = {n.split(".")[0]: tar.extractfile(n).read().decode() for n in tar.getnames() if n.endswith(".src.txt")}
    for path, label in zip(images.paths[:10], images.labels[:10]):
        original = folder / src[Path(path).name.split(".")[0]]
        assert np.array_equal(np.asarray(open_rgb(path)), np.asarray(open_rgb(original)))
        assert label == int(original.parent.name[1:])


def test_knn_and_finetune_take_shards_as_their_splits(folder, split_shards, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        (data / split).symlink_to(folder, target_is_directory=True)
    flags = ["--init", "none", "--model", "mae_vit_tiny_patch4", "--img-size", "16", "--num-workers", "0"]
    for name, root in (("folder", data), ("shards", split_shards)):
        assert main(["knn", *flags, "--data", str(root / "train"), "--out", str(tmp_path / f"{name}.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("folder", "shards"))
    assert a["knn_top1"] == pytest.approx(b["knn_top1"]) and b["train_images"] == b["val_images"] == 39
    assert a["precision"] == "fp32"  # what ran (--precision fp32 is the default of the evaluation commands)
    assert main(["finetune", *flags, "--data", str(split_shards / "train"), "--epochs", "1", "--batch-size", "12",
                 "--log-every", "100", "--out", str(tmp_path / "ft")]) == 0
    ft = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert ft["final_epoch"] == 1 and ft["precision"] in ("fp32", "bf16")


def test_features_of_shards_name_the_files_the_samples_came_from(folder, split_shards, tmp_path, monkeypatch):
    from maelab.commands.features import read_features

    flags = ["--init", "none", "--model", "mae_vit_tiny_patch4", "--img-size", "16", "--num-workers", "0"]
    for name, data in (("folder", folder), ("shards", split_shards / "train")):
        assert main(["features", *flags, "--data", str(data), "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    a, b = (read_features(tmp_path / f"{n}.safetensors") for n in ("folder", "shards"))
    assert sorted(b["paths"]) == sorted(a["paths"])  # the original files, not tar members
    assert (tmp_path / "shards.paths.txt").read_text().splitlines() == b["paths"]
    row = {p: i for i, p in enumerate(a["paths"])}
    order = [row[p] for p in b["paths"]]
    assert torch.allclose(b["features"], a["features"][order], atol=1e-5)
    assert b["labels"].tolist() == a["labels"][order].tolist()
    assert b["meta"]["precision"] == "fp32"
    members = b["meta"]["members"]  # where each row is inside its shard, readable back by maelab
    assert len(members) == 39 and np.array_equal(np.asarray(open_rgb(members[0])), np.asarray(open_rgb(b["paths"][0])))
    images = sh.shard_images(str(split_shards / "train"))
    assert images.subset([3, 1]).names() == [images.names()[3], images.names()[1]]
    monkeypatch.chdir(folder.parent)  # a relative --data: the manifest still names the folder from anywhere
    sh.make_shards(scan_images(folder.name), tmp_path / "rel", 100, progress=False)
    monkeypatch.chdir(tmp_path)
    assert sorted(sh.shard_images(str(tmp_path / "rel")).names()) == sorted(a["paths"])


def test_pictures_of_a_run_on_shards_are_titled_by_their_source_files(folder, split_shards, tmp_path):
    from maelab.commands.visualize import run_images
    from maelab.viz.reconstruct import row_title

    (tmp_path / "config.yaml").write_text(f"data:\n  data: {split_shards / 'train'}\n")
    paths, titles = run_images(tmp_path)
    assert len(paths) == len(titles) > 0 and all(".tar@" in p for p in paths)
    assert all(t.split("/")[0] in ("c0", "c1", "c2") and (folder / t).is_file() for t in titles)
    # and so are the pictures a streamed pre-training draws (they were "train-0000.tar/000003")
    _, names = sh.shard_pictures(sh.open_shards(str(split_shards / "train")), 4, (16, 16))
    assert len(names) == 4 and all((folder / row_title(n)).is_file() for n in names)
    from conftest import TINY_MAE
    from maelab.interop.mae_weights import save_mae
    from maelab.models.mae import MaskedAutoencoder

    mae = save_mae(MaskedAutoencoder(**TINY_MAE), tmp_path / "mae.safetensors")
    # a shard set as --images (what `maelab recipe` passes for a --val-data of shards): a sample of it
    assert main(["visualize", "--checkpoint", str(mae), "--images", str(split_shards / "val"),
                 "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_remote_shards_are_refused_by_the_random_access_commands(split_shards):
    with pytest.raises(MaelabError, match="random access, from local files"):
        sh.shard_images(f"pipe:cat {split_shards}/train/train-{{0000..0001}}.tar")


def _copy_set(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_a_truncated_local_shard_is_refused_by_the_random_access_commands(split_shards, tmp_path):
    """The evaluation commands counted what the cut tar still held and scored fewer images without a word."""
    cut = _copy_set(split_shards / "train", tmp_path / "cut")
    with tarfile.open(cut / "train-0001.tar") as tar:
        members = tar.getmembers()
    first_of_sixth = next(m for m in members if m.name.startswith(sorted({m.name.split(".")[0] for m in members})[5]))
    os.truncate(cut / "train-0001.tar", first_of_sixth.offset)  # at a sample boundary: a valid, shorter tar
    with pytest.raises(MaelabError, match=r"train-0001.tar: it holds 5 samples, its manifest says 10"):
        sh.shard_images(str(cut))


def test_a_pattern_over_shard_sets_with_other_classes_is_refused_where_labels_count(folder, split_shards, tmp_path):
    """Each set's `.cls` numbers its own class list: mixed, a label named another class."""
    other = tmp_path / "other"
    for c in ("c1", "c2", "c3"):
        (other / c).mkdir(parents=True)
        for f in sorted((folder / "c1").iterdir())[:4]:
            (other / c / f.name).write_bytes(f.read_bytes())
    assert main(["shards", "make", "--data", str(other), "--out", str(tmp_path / "set"), "--shard-size", "10"]) == 0
    pattern = f"{{{split_shards / 'train'},{tmp_path / 'set'}}}/train-0000.tar"
    with pytest.raises(MaelabError, match=r"come from shard sets with different classes .*c0, c1, c2.*c1, c2, c3"):
        sh.shard_images(pattern)
    assert sh.open_shards(pattern).counts == [10, 10]  # pre-training ignores labels: each set's own counts
    same = f"{{{split_shards / 'train'},{split_shards / 'val'}}}/train-0000.tar"
    assert len(sh.shard_images(same)) == 20


def test_tars_from_other_tools_read_alike_by_stream_and_by_index(folder, tmp_path):
    """`tar -C dir .` writes `./key.ext`, other tools a folder inside the tar; the key is the member path up to
    the first dot of its file name (webdataset's rule), for the stream and the random-access reader alike."""
    images = sorted((folder / "c2").iterdir())[:3]
    for name, prefix in (("dot", "./"), ("sub", "part/")):
        (tmp_path / name).mkdir()
        with tarfile.open(tmp_path / name / "a-0000.tar", "w") as tar:
            for i, f in enumerate(images):
                for ext, data in (("png", f.read_bytes()), ("cls", b"2")):
                    info = tarfile.TarInfo(f"{prefix}{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        url = str(tmp_path / name / "a-0000.tar")
        streamed = list(sh.read_samples(url))
        indexed = sh.shard_images(url)
        assert len(streamed) == len(indexed) == 3 and indexed.labels == [2, 2, 2]
        for s, path, f in zip(streamed, indexed.paths, images):
            assert np.array_equal(np.asarray(open_rgb(path)), np.asarray(open_rgb(f)))
            assert np.array_equal(np.asarray(sh.decode_sample(s)), np.asarray(open_rgb(f)))


def test_labels_whose_class_list_is_unknown_or_too_short_are_refused(split_shards, tmp_path):
    """A tar without a manifest beside it, in a pattern with a set that has one, had its labels read against
    the other set's classes; labels beyond the manifest's classes ended in an index error in kNN."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "train-0000.tar").write_bytes((split_shards / "train" / "train-0000.tar").read_bytes())
    mixed = f"{{{split_shards / 'train'},{bare}}}/train-0000.tar"
    with pytest.raises(MaelabError, match=r"have no index.json beside them, so the class list their labels count "
                                          r"is unknown"):
        sh.shard_images(mixed)
    assert sh.open_shards(mixed).counts == [10, 10]  # pre-training reads them
    short = _copy_set(split_shards / "train", tmp_path / "short")
    manifest = json.loads((short / SHARD_MANIFEST).read_text())
    (short / SHARD_MANIFEST).write_text(json.dumps({**manifest, "classes": ["c0", "c1"]}))
    with pytest.raises(MaelabError, match=r"hold label 2, but their index.json lists 2 classes"):
        sh.shard_images(str(short))


def test_shards_without_labels_are_named_as_such_by_the_labelled_commands(folder, tmp_path):
    from maelab.data.splits import labelled_split

    with tarfile.open(tmp_path / "nocls-0000.tar", "w") as tar:
        for i, f in enumerate(sorted((folder / "c0").iterdir())[:3]):
            tar.add(f, arcname=f"{i:06d}.png")
    assert len(sh.shard_images(str(tmp_path / "nocls-0000.tar"))) == 3  # features needs no label
    with pytest.raises(MaelabError, match=r"needs a class label for every sample, but 3 sample\(s\) of its shards "
                                          r"have no .cls"):
        labelled_split(str(tmp_path / "nocls-0000.tar"))


def test_a_resume_whose_process_count_changes_the_epoch_names_the_process_count(shard_dir, tmp_path, capsys):
    """Shards go to the processes whole, so with an uneven last shard each process count gives its own epoch
    length: a 2-process run resumed by 1 process was refused with "is it the same dataset?", which sends a
    user requeued on fewer nodes looking for corrupt data. (The state is edited to say what a 2-process run's
    would: one process on 2 cores cannot run a torchrun pair in the default suite's time.)"""
    args = ["pretrain", "--data", str(shard_dir), "--model", "mae_vit_tiny_patch4", "--decoder-depth", "1",
            "--img-size", "16", "--batch-size", "4", "--epochs", "2", "--vis-every", "0", "--device", "cpu",
            "--num-workers", "0", "--out", str(tmp_path / "run")]
    assert main([*args, "--epochs", "1"]) == 0
    last = ckpt.latest_checkpoint(tmp_path / "run")
    state = torch.load(last / ckpt.STATE, weights_only=True)
    assert state["world"] == 1  # recorded from now on
    state.update(world=2, steps_per_epoch=state["steps_per_epoch"] - 1)
    torch.save(state, last / ckpt.STATE)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "these shards give 9 with 1 process(es)" in err and "resume with 2 process(es)" in err
    assert "same dataset" not in err
    del state["world"]  # a checkpoint from before the count was recorded
    torch.save(state, last / ckpt.STATE)
    assert main(args) == 2
    assert "resume with the number of processes it was trained with" in capsys.readouterr().err
    # every process compares the same checkpoint: said by rank 0 alone under torchrun, not once per process
    cfg = build_config(PretrainConfig, dict(data=str(shard_dir), out=str(tmp_path / "run"), model="mae_vit_tiny_patch4",
                                            decoder_depth=1, img_size=[16], batch_size=4, epochs=2, vis_every=0,
                                            device="cpu", num_workers=0))
    with pytest.raises(SameOnEveryRank, match="steps per epoch"):
        run_pretrain(cfg)
    cfg.data.batch_size = 2
    with pytest.raises(SameOnEveryRank, match="global batch of 4"):
        run_pretrain(cfg)
