"""The command line: bad input gives one clear line and a non-zero exit, nothing half-written."""

from __future__ import annotations

import pytest

from maelab.cli import main

FAST = ["--model", "mae_vit_tiny_patch4", "--decoder-depth", "1", "--epochs", "1", "--batch-size", "16",
        "--vis-every", "0", "--device", "cpu", "--num-workers", "0"]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_clear_line(err: str):
    lines = [x for x in err.strip().splitlines() if x.startswith("maelab")]
    assert lines and "Traceback" not in err
    return lines[-1]


@pytest.mark.parametrize("extra,message", [
    (["--img-size", "30"], "not divisible by the patch size"),
    (["--mask-ratio", "1.0"], "mask ratio must be in [0, 1)"),
    (["--mask-ratio", "-0.5"], "mask ratio must be in [0, 1)"),
    (["--model", "mae_vit_gigantic"], "unknown model"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--epochs", "ten"], "epochs: cannot read 'ten'"),
    (["--batch-size", "1000"], "fewer than one global batch"),
])
def test_bad_values_are_one_clear_line_and_nothing_is_written(capsys, tmp_path, cifar_tiny, extra, message):
    out = tmp_path / "run"
    code, _, err = run(capsys, "pretrain", "--data", str(cifar_tiny), "--out", str(out), *FAST, *extra)
    assert code == 2
    assert message in _one_clear_line(err)
    assert not out.exists()


def test_missing_and_empty_data_folders(capsys, tmp_path):
    code, _, err = run(capsys, "pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), *FAST)
    assert code == 2 and "does not exist" in _one_clear_line(err)
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "pretrain", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), *FAST)
    assert code == 2 and "no images found" in _one_clear_line(err)
    code, _, err = run(capsys, "pretrain", "--out", str(tmp_path / "r"), *FAST)
    assert code == 2 and "--data is required" in _one_clear_line(err)
    assert not (tmp_path / "r").exists()


def test_unknown_flag_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--no-such-flag", "1"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--mask-ratio", "--norm-pix-loss", "--accum-iter", "--precision", "--resume",
                 "--save-every", "--keep", "--clip-grad", "--in-memory", "--bad-files", "--config"):
        assert flag in text


def test_resuming_a_run_with_another_architecture_is_refused_and_the_run_untouched(capsys, tmp_path, cifar_tiny):
    out = tmp_path / "run"
    assert run(capsys, "pretrain", "--data", str(cifar_tiny), "--out", str(out), *FAST)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code, _, err = run(capsys, "pretrain", "--data", str(cifar_tiny), "--out", str(out), *FAST,
                       "--model", "mae_vit_tiny_patch2", "--epochs", "2")
    assert code == 2 and "does not fit this model" in _one_clear_line(err)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    code, _, err = run(capsys, "pretrain", "--data", str(cifar_tiny), "--out", str(out), *FAST, "--resume", "never")
    assert code == 2 and "already holds checkpoints" in _one_clear_line(err)


def test_visualize_from_a_run_folder_and_its_errors(capsys, tmp_path, cifar_tiny):
    out = tmp_path / "run"
    assert run(capsys, "pretrain", "--data", str(cifar_tiny), "--out", str(out), *FAST)[0] == 0
    png = tmp_path / "recon.png"
    code, stdout, _ = run(capsys, "visualize", "--checkpoint", str(out), "--mask-ratio", "0.75", "0.9",
                          "--out", str(png), "--seed", "1")
    assert code == 0 and png.stat().st_size > 10_000
    one = next(cifar_tiny.rglob("*.jpg"))
    code, _, _ = run(capsys, "visualize", "--checkpoint", str(out / "checkpoints"), "--images", str(one),
                     "--out", str(tmp_path / "one.png"))
    assert code == 0
    code, _, err = run(capsys, "visualize", "--checkpoint", str(tmp_path / "nothing"), "--out", str(png))
    assert code == 2 and "does not exist" in _one_clear_line(err)
    code, _, err = run(capsys, "visualize", "--checkpoint", str(out), "--images", str(tmp_path / "x.jpg"),
                       "--out", str(png))
    assert code == 2 and "x.jpg" in _one_clear_line(err)
    code, _, err = run(capsys, "visualize", "--checkpoint", str(out), "--mask-ratio", "1.2", "--out", str(png))
    assert code == 2 and "mask ratio" in _one_clear_line(err)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    code, _, err = run(capsys, "visualize", "--checkpoint", str(junk), "--out", str(png))
    assert code == 2 and "cannot read weights" in _one_clear_line(err)


def test_corrupt_image_in_the_data_names_the_file(capsys, tmp_path, cifar_tiny):
    data = tmp_path / "data"
    data.mkdir()
    for p in list(cifar_tiny.rglob("*.jpg"))[:20]:
        (data / p.name.replace(".jpg", f"_{p.parent.name}.jpg")).symlink_to(p)
    (data / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    code, _, err = run(capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "r"), *FAST)
    assert code == 2 and "broken.jpg" in _one_clear_line(err)
    code, _, err = run(capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "r2"), *FAST,
                       "--bad-files", "skip", "--in-memory", "no")
    assert code == 0
