"""The command line: bad input gives one clear line and a non-zero exit, nothing half-written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from maelab.cli import build_parser, main
from maelab.config import config_from_args

REPO = Path(__file__).resolve().parents[1]

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
    (["--mask-ratio", "1.0"], "mask ratio (--mask-ratio) must be in (0, 1)"),
    (["--mask-ratio", "-0.5"], "mask ratio (--mask-ratio) must be in (0, 1)"),
    (["--model", "mae_vit_gigantic"], "unknown model"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--save-every", "-2"], "--save-every must be at least 1"),  # kept a checkpoint every epoch
    (["--vis-every", "-1"], "--vis-every must be at least 0"),
    (["--epochs", "ten"], "epochs: cannot read 'ten'"),
    (["--batch-size", "1000"], "fewer than one global batch"),
    (["--mask-ratio", "0"], "mask ratio 0.0 masks none of the 64 patches"),
    (["--decoder-num-heads", "5"], "decoder_embed_dim=128 is not divisible by decoder_num_heads=5"),
    (["--decoder-embed-dim", "130"], "decoder_embed_dim=130 is not divisible by decoder_num_heads=4"),
    (["--decoder-embed-dim", "0"], "decoder_embed_dim must be a positive whole number, got 0"),
    (["--decoder-embed-dim", "6", "--decoder-num-heads", "2"], "decoder_embed_dim=6 must be a multiple of 4"),
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
    for cmd in ("knn", "finetune", "linprobe"):  # a mistyped --data is named as such, not as a missing split
        code, _, err = run(capsys, cmd, "--init", "none", "--model", "mae_vit_tiny_patch4", "--data", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "r"))
        assert code == 2 and _one_clear_line(err) == f"maelab: error: data folder {tmp_path / 'nope'} does not exist"
    code, _, err = run(capsys, "knn", "--init", "none", "--model", "mae_vit_tiny_patch4", "--data", str(tmp_path / "empty"))
    assert code == 2 and "no validation split: pass --val-data" in _one_clear_line(err)


def test_unknown_flag_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--no-such-flag", "1"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("argv, usage", [
    (["knn", "--bogus"], "usage: maelab knn "),
    (["detect", "eval", "--val-ann", "a.json"], "usage: maelab detect eval "),  # train's flag: eval's are listed
    (["segment", "eval", "--pictures", "2"], "usage: maelab segment eval "),  # training's: it did nothing here
    (["segment", "predict", "--hflip"], "usage: maelab segment predict "),
])
def test_an_unknown_flag_is_said_with_the_usage_of_the_command_given(argv, usage, capsys):
    """argparse said it under the top level's usage ("maelab [-h] [--version] <command> ..."), which lists no
    flag of the command that was typed. segment eval / predict listed training's flags and ignored them."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    flag = next(a for a in argv if a.startswith("--"))
    assert e.value.code == 2 and err.startswith(usage) and f"unrecognized arguments: {flag}" in err


# `maelab ...`, `python -m maelab.cli ...` or `torchrun ... -m maelab.cli ...`, after any VAR=value
DOC_COMMAND = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:maelab|python -m maelab\.cli|torchrun\b.*?-m maelab\.cli) ([a-z].*)$")


def documented_commands(text: str) -> list[str]:
    """The maelab command lines in a markdown text's code blocks (continuation lines joined)."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if m := DOC_COMMAND.match(line.strip()):
                lines.append(m.group(1))
    return lines


def refusal(command: str, parser, capsys) -> str:
    """'' when today's parser takes a documented command and its config resolves (flags, choices, presets,
    value types); the parser's or the config's message otherwise. `...` stands for more flags and is left out."""
    try:
        args = parser.parse_args([a for a in shlex.split(command, comments=True) if a != "..."])
        if args.command_options.Config is not None:
            config_from_args(args.command_options.Config, args)
    except SystemExit as e:
        return capsys.readouterr().err.strip().splitlines()[-1] if e.code else ""
    except Exception as e:  # a config value the docs got wrong
        return f"{type(e).__name__}: {e}"
    return ""


def test_every_command_the_docs_show_runs_with_todays_flags(capsys):
    """A newcomer copies commands from the README and docs: a renamed or removed flag, a preset that is
    gone or a value of the wrong type in any of them fails here, not in their terminal."""
    docs = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    commands = [(doc.relative_to(REPO), c) for doc in docs for c in documented_commands(doc.read_text())]
    assert len(commands) >= 30 and {str(d) for d, _ in commands} >= {"README.md", "docs/scaling.md"}
    parser = build_parser()
    stale = [f"{doc}: maelab {c}\n  -> {why}" for doc, c in commands if (why := refusal(c, parser, capsys))]
    assert not stale, "\n".join(stale)
    # the check can fail: a removed flag, an unknown preset and a value of the wrong type are each caught
    block = "```bash\nmaelab pretrain --data d --no-such-flag 1\nmaelab knn --config nope --data d\n" \
            "OMP_NUM_THREADS=1 maelab pretrain --data d \\\n  --epochs ten\n```"
    assert [bool(refusal(c, parser, capsys)) for c in documented_commands(block)] == [True, True, True]


def main_in_a_fresh_python(argvs: list[list[str]], modules: tuple[str, ...]):
    """``main(argv)`` for each of ``argvs`` in one new interpreter: (the process, each argv's exit status,
    which of ``modules`` it had loaded at the end)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom maelab.cli import main\n"
             f"for argv in {argvs!r}:\n"
             "    try:\n        main(argv)\n    except SystemExit as e:\n        print('exit', e.code)\n"
             f"print(sorted(m for m in {modules!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    lines = done.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("["), done.stdout[-2000:] + done.stderr[-2000:]
    return done, [line for line in lines if line.startswith("exit ")], lines[-1]


def test_the_command_list_and_a_mistyped_command_answer_without_loading_torch():
    """`maelab --help`, `--version` and a typo used to import every command, and with them torch, timm and
    torchvision: 6.5 s on a 2-core CPU before a word was printed. Now the list comes from the registry and
    only the command that runs is imported."""
    done, _, loaded = main_in_a_fresh_python([["--help"], ["--version"], ["pretrian"]],
                                             ("torch", "maelab.commands.pretrain"))
    assert loaded == "[]", done.stdout + done.stderr
    assert "invalid choice: 'pretrian'" in done.stderr
    assert "pretrain" in done.stdout and "MAE pre-training on a folder of images" in done.stdout  # the list


def test_every_registered_command_has_its_module():
    from maelab.commands import COMMANDS, load, options_of

    for name in COMMANDS:
        opts = options_of(name)
        assert opts.NAME == name and opts.DESCRIPTION and callable(load(name).run)
        assert opts.Config is not None or callable(opts.add_arguments)


def test_python_dash_m_maelab_is_the_console_script():
    """Where the console script is not on PATH (a cluster's module system, a venv not activated),
    `python -m maelab` is the command a user tries first."""
    import subprocess
    import sys

    from maelab import __version__

    done = subprocess.run([sys.executable, "-m", "maelab", "--version"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == f"maelab {__version__}", done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "maelab", "pretrain", "--data", "nowhere/at/all"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 2 and done.stderr.startswith("maelab: error:") and "nowhere/at/all" in done.stderr
    assert "Traceback" not in done.stderr


def test_every_commands_help_and_a_refused_flag_answer_without_loading_torch():
    """`maelab <command> --help` used to import the command, and with it torch, timm and torchvision: 5 s
    (8 s cold) on a 2-core CPU before the flags were shown. The flags now come from the options modules
    alone; the command's own module is imported only to run it."""
    from maelab.commands import COMMANDS

    argvs = [[name, "--help"] for name in COMMANDS]
    argvs += [["segment", action, "--help"] for action in ("train", "eval", "predict")]
    argvs += [["detect", action, "--help"] for action in ("train", "eval", "predict")]
    argvs += [["pretrain", "--data", "d", "--mask-type", "nope"], ["finetune", "--global-pool", "max"]]
    done, exits, loaded = main_in_a_fresh_python(argvs, ("torch", "timm", "torchvision", "numpy", "PIL", "matplotlib"))
    assert loaded == "[]", done.stdout[-2000:] + done.stderr[-2000:]
    assert exits == ["exit 0"] * (len(argvs) - 2) + ["exit 2"] * 2
    assert "--mask-ratio" in done.stdout and "--decoder-depth" in done.stdout and "--layer-decay" in done.stdout
    assert "invalid choice: 'nope'" in done.stderr and "invalid choice: 'max'" in done.stderr


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
    def files():  # the run's own files; the lock file names whichever process last held the folder
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".maelab.lock"}

    before = files()
    code, _, err = run(capsys, "pretrain", "--data", str(cifar_tiny), "--out", str(out), *FAST,
                       "--model", "mae_vit_tiny_patch2", "--epochs", "2")
    assert code == 2 and "changed settings: --model 'mae_vit_tiny_patch2'" in _one_clear_line(err)
    assert files() == before
    code, _, err = run(capsys, "pretrain", "--data", str(cifar_tiny), "--out", str(out), *FAST, "--resume", "never")
    assert code == 2 and "already holds checkpoints" in _one_clear_line(err)


def test_visualize_from_a_run_folder_and_its_errors(capsys, tmp_path, cifar_tiny):
    out = tmp_path / "run"
    assert run(capsys, "pretrain", "--data", str(cifar_tiny), "--out", str(out), *FAST)[0] == 0
    png = tmp_path / "recon.png"
    code, stdout, _ = run(capsys, "visualize", "--checkpoint", str(out), "--mask-ratio", "0.75", "0.9",
                          "--out", str(png), "--seed", "1")
    assert code == 0 and png.stat().st_size > 10_000
    one = next(p for p in sorted(cifar_tiny.rglob("*")) if p.is_file())  # .jpg, or .png when synthetic
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
    for p in [p for p in sorted(cifar_tiny.rglob("*")) if p.is_file()][:20]:
        (data / f"{p.parent.name}_{p.name}").symlink_to(p)
    (data / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    code, _, err = run(capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "r"), *FAST)
    assert code == 2 and "broken.jpg" in _one_clear_line(err)
    code, _, err = run(capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "r2"), *FAST,
                       "--bad-files", "skip", "--in-memory", "no")
    assert code == 0


# --- file-system errors, visualize --out, convert ---------------------------------------------------
import torch  # noqa: E402

from conftest import TINY_MAE  # noqa: E402


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory):
    from maelab.interop.mae_weights import save_mae
    from maelab.models.mae import MaskedAutoencoder

    torch.manual_seed(0)
    return save_mae(MaskedAutoencoder(**TINY_MAE), tmp_path_factory.mktemp("mae") / "mae.safetensors")


def _finetune_run(run_dir, num_classes=3, pool="avg"):
    """A maelab fine-tune run folder, as `maelab finetune` leaves it (checkpoints/epoch_0001/...)."""
    from maelab.models.vit import build_vit, vit_arch, vit_meta
    from maelab.train.checkpoint import save_checkpoint

    arch = vit_arch(TINY_MAE)
    torch.manual_seed(1)
    vit = build_vit(arch, num_classes, pool)
    meta = vit_meta(arch, arch["img_size"], num_classes=num_classes, global_pool=pool,
                    classes=[f"c{i}" for i in range(num_classes)], init="mae.safetensors")
    save_checkpoint(run_dir, "epoch_0001", vit.state_dict(), {"epoch": 1}, {"model": meta, "global_step": 1})
    return vit.eval()


def test_file_system_errors_are_one_line_naming_the_path(capsys, tmp_path, mae_file):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run(capsys, "convert", str(mae_file), str(afile), "--to", "hf")  # a folder where a file is
    assert code == 2 and _one_clear_line(err) == f"maelab: error: cannot write {afile}: {afile} is a file, not a folder"
    code, _, err = run(capsys, "convert", str(mae_file), str(afile / "x.safetensors"), "--to", "timm")
    assert code == 2 and f"cannot write {afile / 'x.safetensors'}: {afile} is a file" in _one_clear_line(err)
    code, _, err = run(capsys, "convert", str(mae_file), "/proc/maelab-nope/out", "--to", "hf")
    assert code == 2 and "cannot write /proc/maelab-nope/out: No such file or directory" in _one_clear_line(err)


def test_permission_errors_are_one_line_and_real_bugs_keep_their_traceback(capsys, tmp_path, monkeypatch, mae_file):
    import maelab.commands.convert

    out = tmp_path / "locked" / "out.safetensors"

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(maelab.commands.convert, "convert", denied)
    code, _, err = run(capsys, "convert", str(mae_file), str(out), "--to", "timm")
    assert code == 2 and _one_clear_line(err) == f"maelab: error: cannot write {out}: Permission denied"

    def bug(*a, **k):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(maelab.commands.convert, "convert", bug)
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["convert", str(mae_file), str(out), "--to", "timm"])


def test_visualize_into_a_folder_writes_reconstruction_png_inside(capsys, tmp_path, mae_file, cifar_tiny):
    one = str(next(p for p in sorted(cifar_tiny.rglob("*")) if p.is_file()))
    code, out, _ = run(capsys, "visualize", "--checkpoint", str(mae_file), "--images", one,
                       "--out", str(tmp_path / "vis") + "/")
    assert code == 0 and (tmp_path / "vis" / "reconstruction.png").is_file()
    assert f"wrote {tmp_path / 'vis' / 'reconstruction.png'}" in out
    (tmp_path / "existing").mkdir()
    code, _, _ = run(capsys, "visualize", "--checkpoint", str(mae_file), "--images", one, "--out", str(tmp_path / "existing"))
    assert code == 0 and (tmp_path / "existing" / "reconstruction.png").is_file()
    code, _, err = run(capsys, "visualize", "--checkpoint", str(mae_file), "--images", one, "--mask-ratio", "0",
                       "--out", str(tmp_path / "z.png"))
    assert code == 2 and "masks none of the 16 patches" in _one_clear_line(err)


def test_convert_explains_a_fine_tune_run_and_exports_it_to_timm(capsys, tmp_path):
    run_dir = tmp_path / "ft1"
    _finetune_run(run_dir)
    code, _, err = run(capsys, "convert", str(run_dir), str(tmp_path / "hf"), "--to", "hf")
    line = _one_clear_line(err)
    assert code == 2 and f"{run_dir} is a fine-tuned classifier (3 classes" in line and "no decoder" in line
    assert "--init of finetune / linprobe / knn / features" in line and "--to timm" in line
    assert "use `maelab convert` for foreign weights" not in line
    code, _, _ = run(capsys, "convert", str(run_dir), str(tmp_path / "o.pth"), "--to", "official")
    assert code == 0 and (tmp_path / "o.pth").is_file()  # a classifier in the official layout, head included
    code, _, err = run(capsys, "visualize", "--checkpoint", str(run_dir), "--images", "x.png",
                       "--out", str(tmp_path / "v.png"))
    assert code == 2 and "is a fine-tuned maelab classifier" in _one_clear_line(err)
    code, out, _ = run(capsys, "convert", str(run_dir), str(tmp_path / "ft_timm"), "--to", "timm")
    assert code == 0 and (tmp_path / "ft_timm.safetensors").is_file()
    assert ".safetensors added" in out  # the output had no extension: timm picks its loader by it
    code, _, err = run(capsys, "convert", str(run_dir), str(tmp_path / "t.safetensors"), "--to", "timm",
                       "--global-pool", "token")
    assert code == 2 and "fine-tuned with global pool 'avg'" in _one_clear_line(err)


def test_convert_explains_encoder_only_and_non_checkpoint_files(capsys, tmp_path, mae_file):
    enc = tmp_path / "enc.safetensors"
    assert run(capsys, "convert", str(mae_file), str(enc), "--to", "timm")[0] == 0
    code, _, err = run(capsys, "convert", str(enc), str(tmp_path / "back.safetensors"), "--to", "maelab")
    line = _one_clear_line(err)
    assert code == 2 and "encoder-only ViT weights" in line and "cannot become an MAE checkpoint" in line
    assert "--init of finetune" in line and "use `maelab convert`" not in line
    enc_pth = tmp_path / "enc.pth"
    assert run(capsys, "convert", str(mae_file), str(enc_pth), "--to", "official", "--encoder-only")[0] == 0
    for flags, said in ((["--to", "timm", "--encoder-only"], "--encoder-only shapes a --to official export"),
                        (["--to", "official", "--global-pool", "avg"], "--global-pool shapes a --to timm export"),
                        (["--to", "official", "--hf-naming", "v4"], "--hf-naming shapes a --to hf export")):
        code, _, err = run(capsys, "convert", str(mae_file), str(tmp_path / "x"), *flags)  # were passed over
        assert code == 2 and said in _one_clear_line(err) and not list(tmp_path.glob("x*"))
    code, _, err = run(capsys, "convert", str(enc_pth), str(tmp_path / "b2"), "--to", "hf")
    assert code == 2 and "encoder-only checkpoint" in _one_clear_line(err) and "--to timm" in _one_clear_line(err)
    text = tmp_path / "notes.pth"
    text.write_text("epochs: 3\n")
    for cmd in (["convert", str(text), str(tmp_path / "t.safetensors"), "--to", "timm"],
                ["visualize", "--checkpoint", str(text), "--images", "x.png", "--out", str(tmp_path / "v.png")]):
        code, _, err = run(capsys, *cmd)
        assert code == 2 and "it is a text file, not a PyTorch (.pth / .pt / .bin) or safetensors checkpoint" \
            in _one_clear_line(err)
    for to, name, wanted in (("timm", "x.pth", "x.pth.safetensors or x.safetensors"),
                             ("maelab", "x.pth", "x.pth.safetensors or x.safetensors"),
                             ("official", "x.safetensors", "x.safetensors.pth or x.pth")):
        code, _, err = run(capsys, "convert", str(mae_file), str(tmp_path / name), "--to", to)
        assert code == 2 and f"name the output {wanted}" in _one_clear_line(err)  # other tools go by the suffix
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "x.safetensors").exists()


def test_convert_reads_formats_by_content_and_adds_missing_suffixes(capsys, tmp_path, mae_file):
    from maelab.interop.mae_weights import load_mae

    misnamed = tmp_path / "really_safetensors.pth"  # a maelab file under an official-looking name
    misnamed.write_bytes(mae_file.read_bytes())
    code, out, _ = run(capsys, "convert", str(misnamed), str(tmp_path / "official"), "--to", "official")
    assert code == 0 and "official.pth (.pth added" in out
    pth_as_st = tmp_path / "official_as.safetensors"  # and an official .pth under a safetensors name
    pth_as_st.write_bytes((tmp_path / "official.pth").read_bytes())
    code, out, _ = run(capsys, "convert", str(pth_as_st), str(tmp_path / "again"), "--to", "maelab")
    assert code == 0 and (tmp_path / "again.safetensors").is_file()
    a, _ = load_mae(mae_file)
    b, _ = load_mae(tmp_path / "again.safetensors")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("cmd,flags,expected", [
    ("pretrain", ["--clip-grad", "-1"], "--clip-grad"),
    ("pretrain", ["--weight-decay", "-1"], "--weight-decay"),
    ("pretrain", ["--lr", "-1"], "--lr"),
    ("finetune", ["--auto-augment", "bogus"], "--auto-augment"),
    ("linprobe", ["--momentum", "1.5"], "--momentum"),
])
def test_bad_optimisation_settings_are_refused_before_anything_runs(capsys, tmp_path, cifar_tiny, cmd, flags, expected):
    out = tmp_path / "run"
    extra = FAST if cmd == "pretrain" else ["--init", "none", "--model", "mae_vit_tiny_patch4", "--device", "cpu"]
    code, _, err = run(capsys, cmd, "--data", str(cifar_tiny), "--out", str(out), *extra, *flags)
    assert code == 2 and expected in _one_clear_line(err)
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["knn", "features"])
def test_an_output_file_that_is_a_folder_is_refused_before_the_work(capsys, tmp_path, cifar_tiny, cmd):
    (tmp_path / "adir.npy").mkdir()
    code, out, err = run(capsys, cmd, "--init", "none", "--model", "mae_vit_tiny_patch4", "--device", "cpu",
                         "--data", str(cifar_tiny), "--out", str(tmp_path / "adir.npy"))
    assert code == 2 and "is a folder" in _one_clear_line(err) and "top-1" not in out


def test_a_full_disk_is_one_line_whichever_writer_hit_it(capsys, tmp_path, mae_file, monkeypatch):
    """safetensors and torch.save report a full disk in their own words (and an OSError may name no file):
    every command says it in one line, and `convert --to hf` leaves no folder that looks like a model."""
    import errno

    from safetensors import SafetensorError

    from maelab.commands import convert

    def full_after_config(model, directory, naming):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "config.json").write_text("{}")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(convert, "save_hf_pretrained", full_after_config)
    code, _, err = run(capsys, "convert", str(mae_file), str(tmp_path / "hf"), "--to", "hf")
    assert code == 2 and f"no space left on the disk of {tmp_path / 'hf'} (" in _one_clear_line(err)
    assert not (tmp_path / "hf").exists()
    for error in (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10240320 vs 10240208"),
                  OSError(errno.ENOSPC, "No space left on device")):  # torch.save's words; an OSError naming no file
        def full(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(convert, "export_official", full)
        code, _, err = run(capsys, "convert", str(mae_file), str(tmp_path / "o.pth"), "--to", "official")
        assert code == 2 and "MB free): free some space and run the same command again" in _one_clear_line(err)

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(convert, "export_official", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        main(["convert", str(mae_file), str(tmp_path / "o.pth"), "--to", "official"])


def test_maelab_warnings_are_one_line_without_the_source_location(capsys, tmp_path):
    """A warning is a message to the user: Python's default adds the module path, line and source line."""
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_text("x")
    code, _, err = run(capsys, "features", "--init", "none", "--model", "mae_vit_tiny_patch4", "--img-size", "32",
                       "--data", str(tmp_path), "--bad-files", "skip", "--num-workers", "0",
                       "--out", str(tmp_path / "f.npy"))
    assert code == 0
    assert "maelab: warning: skipping unreadable image: cannot read image" in err and "bad.png" in err
    assert "UserWarning" not in err and "folders.py" not in err, err


def test_a_reader_that_goes_away_ends_the_command_without_a_hang(tmp_path):
    """`maelab features ... 2>&1 | head -1`: the write after the reader left raised BrokenPipeError with the
    loader's workers alive (they ignore SIGTERM), and Python's exit waited for them forever."""
    import os
    import subprocess
    import sys

    from PIL import Image

    for i in range(24):
        Image.new("RGB", (32, 32), (i * 10, 0, 0)).save(tmp_path / f"{i:02d}.png")
    cmd = [sys.executable, "-m", "maelab.cli", "features", "--init", "none", "--model", "mae_vit_tiny_patch4",
           "--img-size", "48", "--crop-pct", "1.0", "--num-workers", "2", "--data", str(tmp_path),
           "--out", str(tmp_path / "f.npy")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout.readline().startswith(b"maelab features:")
    proc.stdout.close()  # the reader goes away, as `head -1` does
    try:
        assert proc.wait(timeout=120) == 141  # 128 + SIGPIPE, as a shell tool ends
    finally:
        proc.kill()


def test_a_collective_broken_by_a_dead_peer_is_one_line(capsys, monkeypatch):
    """Under torchrun, the survivors of a killed process used to print gloo's 30-line traceback before the
    elastic restart (which then resumed bit-equal): it read like a bug of their own."""
    import maelab.cli as cli

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:5521: "
                        "Connection reset by peer")

    def dispatch(args):
        raise gloo

    monkeypatch.setattr(cli, "dispatch", dispatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "process 1: another process of this job stopped (Connection reset by peer" in err
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no peer to lose, so an error of its own (a traceback)
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        cli.main(["models"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli._peer_lost(RuntimeError("CUDA out of memory")) is None


def test_errors_and_warnings_of_the_settings_are_said_by_rank_0_alone(capsys, tmp_path, monkeypatch):
    """Under torchrun every process printed them: 8 alike lines per node (an --out inside --data, a missing
    folder, --init none without --model, a seed out of range; the --num-workers cap and val = train warnings)."""
    import warnings

    from maelab.data import workers
    from maelab.errors import warn_for_job

    (tmp_path / "data").mkdir()
    cases = [["pretrain", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "data" / "run")],
             ["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")],
             ["knn", "--init", "none", "--data", str(tmp_path / "data")],
             ["pretrain", "--data", str(tmp_path / "data"), "--seed", "-1"]]
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        for args in cases:
            assert main(args) == 2
            assert ("maelab: error:" in capsys.readouterr().err) == said, (rank, args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_for_job("alike on every process")
            monkeypatch.setattr(workers, "_CAPPED", set())
            workers.default_workers(10_000)
        assert len(caught) == (2 if said else 0), rank


@pytest.mark.parametrize("argv, said", [
    (["pretrain", "--budget", "-5m"], "--budget must be longer than zero, got '-5m'"),
    (["pretrain", "--base-lr", "-1e-3"], "--base-lr must be positive, got -0.001"),
    (["knn", "--init", "none", "--temperature", "-.5"], "--temperature a positive finite number, got 20, -0.5"),
    (["segment", "train", "--init", "none", "--base-lr", "-2e-4"], "--base-lr must be positive"),
    # values no range check written "x < 0" / "x <= 0" refused: inf (a kNN of equal votes), nan (any flag), a score
    # threshold outside [0, 1] (nothing or everything drawn)
    (["knn", "--init", "none", "--temperature", "inf"], "--temperature a positive finite number, got 20, inf"),
    (["knn", "--init", "none", "--temperature", "nan"], "--temperature must be a number, got nan"),
    (["segment", "train", "--init", "none", "--aux-weight", "inf"], "--aux-weight must be >= 0 and finite, got inf"),
    (["detect", "train", "--init", "none", "--score-threshold", "2"], "--score-threshold must be in [0, 1], got 2"),
    # said before the encoder is read, naming the flag (the neck said "takes 4 feature maps, got 2")
    (["segment", "train", "--init", "none", "--out-indices", "1", "2"], "--out-indices takes 4 block numbers"),
    (["segment", "train", "--init", "none", "--num-classes", "0"], "--num-classes 0: camvid's classes are fixed"),
    (["segment", "train", "--init", "none", "--ratio-range", "2", "1"], "--ratio-range takes two numbers 0 < low"),
    (["segment", "train", "--init", "none", "--pictures", "-1"], "--pictures must be"),
])
def test_a_negative_value_reaches_its_flags_own_check(capsys, tmp_path, argv, said):
    """argparse took `-5m` and `-1e-3` for flags: "expected one argument", not what is wrong with the value.
    (And other values out of range are said.)"""
    assert main([*argv, "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert said in err and "expected one argument" not in err, err


def test_detect_predict_refuses_a_score_threshold_out_of_range(capsys, tmp_path):
    assert main(["detect", "predict", "--checkpoint", "x", "--images", str(tmp_path), "--score-threshold", "-1",
                 "--out", str(tmp_path / "d.png")]) == 2
    assert "--score-threshold must be in [0, 1], got -1" in capsys.readouterr().err


def test_a_flag_after_a_value_flag_is_still_a_flag():
    from maelab.cli import negative_values_joined

    parser = build_parser(["pretrain"])
    assert negative_values_joined(parser, ["pretrain", "--budget", "--epochs", "3", "--seed", "-2x"]) == \
        ["pretrain", "--budget", "--epochs", "3", "--seed=-2x"]
    assert negative_values_joined(parser, ["pretrain", "--mask-ratio", "-1", "--img-size", "-3e1"]) == \
        ["pretrain", "--mask-ratio=-1", "--img-size", "-3e1"]  # --img-size takes one or two: argparse reads them


def test_what_every_process_meets_before_joining_the_job_is_said_once(capsys, tmp_path, monkeypatch):
    """Under torchrun, a settings error of `validate` (`--mask-ratio 1.5`) or a warning while the model is
    built (a ratio that hides every patch) was printed by every process: before the group is joined a
    command has read only its settings and its node's files, so each node's first process says it. After
    it, each process says its own errors."""
    from maelab import errors

    (tmp_path / "data").mkdir()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(errors._Job, "joining", False)
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)  # one node
        assert main(["pretrain", "--data", str(tmp_path / "data"), "--mask-ratio", "1.5"]) == 2
        assert ("maelab: error: mask ratio (--mask-ratio) must be in (0, 1)" in capsys.readouterr().err) == said
        assert main(["pretrain", "--data", str(tmp_path / "data"), "--mask-ratio", "0.999", "--mask-type", "grid",
                     "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert ("maelab: warning: mask ratio 0.999 would hide all" in err) == said, err
        assert ("--mask-type grid keeps one patch of every k x k" in err) == said, err
    monkeypatch.setenv("RANK", "3")  # the first process of the second node: its files may differ (a --config
    monkeypatch.setenv("LOCAL_RANK", "0")  # missing there alone), so it speaks for its node
    assert main(["pretrain", "--config", str(tmp_path / "nothere.yaml"), "--data", str(tmp_path / "data")]) == 2
    assert "maelab: error: " in capsys.readouterr().err
    assert not errors.said_by_this_rank(errors.SameOnEveryRank("no such folder"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(errors._Job, "joining", True)  # joined: an error may be this process's alone
    assert errors.said_by_this_rank(errors.MaelabError("cannot read image x.jpg"))


@pytest.mark.parametrize("argv, said", [
    (["pretrain"], "outside the training loop; checkpoints already written are kept"),
    (["segment", "train"], "outside the training loop; checkpoints already written are kept"),
    (["knn"], "before `maelab knn` finished; every file it writes appears whole or not at all"),
    (["segment", "predict"], "before `maelab segment` finished"),
])
def test_a_sigterm_outside_training_says_what_it_leaves(capsys, monkeypatch, argv, said):
    """`features`, `knn`, `convert` were told "checkpoints already written are kept": they have none."""
    import maelab.cli as cli
    from maelab.errors import Terminated

    def dispatch(args):
        raise Terminated

    monkeypatch.setattr(cli, "dispatch", dispatch)
    assert cli.main(argv) == 143
    err = capsys.readouterr().err
    assert err.startswith("maelab: stopped by SIGTERM ") and said in err and err.count("\n") == 1, err


def test_a_sigterm_after_the_work_is_done_does_not_turn_success_into_143(monkeypatch):
    """A SIGTERM in the second or two while a finished command's interpreter winds down ended it with 143
    and no word: a scheduler (or a recipe step) read a complete run as killed."""
    import signal

    import maelab.cli as cli

    before = signal.getsignal(signal.SIGTERM)
    try:
        for code, ignored in ((0, True), (2, False)):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            monkeypatch.setattr(cli, "main", lambda code=code: code)
            with pytest.raises(SystemExit) as done:
                cli.entry()
            assert done.value.code == code
            assert (signal.getsignal(signal.SIGTERM) == signal.SIG_IGN) == ignored
    finally:
        signal.signal(signal.SIGTERM, before)
