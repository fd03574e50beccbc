"""`torchlns convert | report | compare` (torchlns/apps/cli.py): results, files and user errors.

The float models live in a helper module written to a temporary directory that is put on
sys.path (and PYTHONPATH for the subprocess runs), as a user's own model code would be.
"""

import json
import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, FP8_E5M2, INT8, ClusterConfig, ConvertConfig, LNSFormat
from torchlns.__main__ import build_parser, main
from torchlns.apps.cli import compare_outputs

ROOT = Path(__file__).resolve().parents[2]
HELPER = "torchlns_cli_tinynet"  # the helper module's name; unique so it never shadows anything

HELPER_SOURCE = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class TinyNet(nn.Module):
        """Conv2d + BN + ReLU + Conv2d: a dense (N, 4, H, W) output."""

        def __init__(self, width=8):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(width, 4, 3, padding=1)

        def forward(self, x):
            return self.conv2(self.relu(self.bn1(self.conv1(x))))


    class TinyClassifier(TinyNet):
        """TinyNet averaged over space: (N, 4) logits."""

        def forward(self, x):
            return super().forward(x).mean((2, 3))


    def make():
        return TinyNet().eval()


    def make_wide():
        return TinyNet(width=6).eval()


    class DictNet(TinyNet):
        """TinyNet with a detector-style output: a dict of tensors."""

        def forward(self, x):
            return {"heatmap": super().forward(x)}


    def make_dict():
        return DictNet().eval()


    def needs_args(width):
        return TinyNet(width)


    NOT_CALLABLE = 3
''')

FORMATS = {  # the spec of --format, written out independently of torchlns.cli
    "lns8": ConvertConfig(),
    "lns8-chip": ConvertConfig(mac=CHIP_MAC),
    "lns8-mitchell": ConvertConfig(fmt=LNSFormat(8, 3, "mitchell")),
    "fp8-e4m3": ConvertConfig(fmt=FP8_E4M3),
    "fp8-e5m2": ConvertConfig(fmt=FP8_E5M2),
    "int8": ConvertConfig(fmt=INT8),
}


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / f"{HELPER}.py").write_text(HELPER_SOURCE)
    sys.path.insert(0, str(d))
    try:
        helper = __import__(HELPER)
        torch.manual_seed(0)
        net = _randomise_bn(helper.TinyNet())
        clf = _randomise_bn(helper.TinyClassifier())
        x = torch.randn(40, 3, 8, 8)
        with torch.no_grad():
            pixel_targets = net(x).argmax(1)
            labels = clf(x).argmax(1)
        f = SimpleNamespace(dir=d, helper=helper, net=net, clf=clf, x=x,
                            sd=d / "net.pt", module=d / "net_module.pt", clf_sd=d / "clf.pt",
                            data=d / "data.pt", labelled=d / "labelled.pt", plain=d / "plain.pt")
        torch.save(net.state_dict(), f.sd)
        torch.save(net, f.module)
        torch.save(clf.state_dict(), f.clf_sd)
        torch.save(x, f.data)  # a bare tensor
        torch.save({"inputs": x, "targets": pixel_targets}, f.labelled)
        torch.save({"inputs": x, "targets": labels}, d / "labels.pt")
        f.labels = d / "labels.pt"
        yield f
    finally:
        sys.path.remove(str(d))
        sys.modules.pop(HELPER, None)


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def direct(model, config, x, batch_size=16, max_batches=None):
    batches = list(x.split(batch_size))[:max_batches]
    return torchlns.convert(model, config, calibration_data=batches)


def run(model, x):
    with torch.no_grad():
        return model.eval()(x)


def assert_one_error_line(err, *needles):
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("torchlns: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


# ----------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------
def test_convert_state_dict_in_process(env, capsys, tmp_path):
    out = tmp_path / "q.pt"
    rc, stdout, err = cli(capsys, "convert", env.sd, "--model-class", f"{HELPER}:TinyNet",
                          "--calib", env.data, "-o", out)
    assert rc == 0, err
    assert "fold_batchnorm: 1 folded" in stdout
    assert re.search(r"^conv1\s+LNSConv2d\s+LNS8\(F=3\)", stdout, re.M)
    assert re.search(r"^conv2\s+LNSConv2d\s+LNS8\(F=3\)", stdout, re.M)
    assert re.search(r"^total\s", stdout, re.M)

    ref = direct(env.net, ConvertConfig(), env.x)
    loaded = torch.load(out, weights_only=False)
    assert isinstance(loaded.conv1, torchlns.LNSConv2d)
    assert torch.equal(run(loaded, env.x), run(ref, env.x))

    sd = torch.load(tmp_path / "q.state_dict.pt", weights_only=True)
    expected = ref.state_dict()
    assert sd.keys() == expected.keys()
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert type(sd[k]) is type(v), k
            assert torch.equal(sd[k].codes, v.codes) if isinstance(v, torchlns.CodedTensor) else torch.equal(sd[k], v)
    skeleton = direct(env.net, ConvertConfig(), env.x * 3)  # other calibration, then the saved state
    skeleton.load_state_dict(sd)
    assert torch.equal(run(skeleton, env.x), run(ref, env.x))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(out, weights_only=True)  # the module itself is a pickle, as torch.save makes it


def test_convert_subprocess(env, tmp_path):
    out = tmp_path / "sub.pt"
    envvars = {**os.environ, "PYTHONPATH": os.pathsep.join([str(env.dir), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torchlns", "convert", str(env.sd), "--model-class", f"{HELPER}:make",
         "--calib", str(env.labelled), "-o", str(out), "--format", "lns8-chip"],
        cwd=ROOT, env=envvars, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "conversion:" in proc.stdout and "MAC(lut8, fixed32)" in proc.stdout
    ref = direct(env.net, FORMATS["lns8-chip"], env.x)
    assert torch.equal(run(torch.load(out, weights_only=False), env.x), run(ref, env.x))
    assert (tmp_path / "sub.state_dict.pt").exists()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_convert_each_format_matches_direct_convert(env, capsys, tmp_path, fmt):
    out = tmp_path / f"{fmt}.pt"
    rc, stdout, err = cli(capsys, "convert", env.sd, "--model-class", f"{HELPER}:make", "--calib", env.data,
                          "-o", out, "--format", fmt)
    assert rc == 0, err
    config = FORMATS[fmt]
    assert str(config.fmt) in stdout
    ref = direct(env.net, config, env.x)
    got = torch.load(out, weights_only=False)
    assert got.conv1.fmt == config.fmt and got.conv1.mac == ref.conv1.mac
    assert torch.equal(run(got, env.x), run(ref, env.x))
    sd = torch.load(tmp_path / f"{fmt}.state_dict.pt", weights_only=True)
    assert torch.equal(sd["conv2.weight"].codes, ref.conv2.weight.codes)


@pytest.mark.parametrize("options, config, batch_size, max_batches", [
    (["--calibrator", "percentile"], ConvertConfig(calibrator="percentile"), 16, None),
    (["--calibrator", "mse", "--batch-size", "8", "--max-batches", "2"], ConvertConfig(calibrator="mse"), 8, 2),
    (["--activation", "dynamic"], ConvertConfig(activation="dynamic"), 16, None),
])
def test_convert_calibration_options(env, capsys, tmp_path, options, config, batch_size, max_batches):
    out = tmp_path / "q.pt"
    rc, stdout, err = cli(capsys, "convert", env.sd, "--model-class", f"{HELPER}:make", "--calib", env.data,
                          "-o", out, *options)
    assert rc == 0, err
    ref = direct(env.net, config, env.x, batch_size, max_batches)
    assert torch.equal(run(torch.load(out, weights_only=False), env.x), run(ref, env.x))


@pytest.mark.parametrize("scope", [None, "network"])
def test_convert_cluster(env, capsys, tmp_path, scope):
    out = tmp_path / "c.pt"
    extra = [] if scope is None else ["--cluster-scope", scope]
    rc, stdout, err = cli(capsys, "convert", env.sd, "--model-class", f"{HELPER}:make", "--calib", env.data,
                          "-o", out, "--cluster", "4", *extra)
    assert rc == 0, err
    assert "cluster_kernels (C=4" in stdout
    ref = direct(env.net, ConvertConfig(cluster=ClusterConfig(4, scope or "layer")), env.x)
    got = torch.load(out, weights_only=False)
    assert isinstance(got.conv1, torchlns.LNSClusteredConv2d) and got.conv1.num_clusters == 4
    assert torch.equal(run(got, env.x), run(ref, env.x))


@pytest.mark.parametrize("keep", [["conv2"], ["conv2*"], ["conv1", "conv2"]])
def test_convert_keep_float(env, capsys, tmp_path, keep):
    out = tmp_path / "k.pt"
    rc, stdout, err = cli(capsys, "convert", env.sd, "--model-class", f"{HELPER}:make", "--calib", env.data,
                          "-o", out, "--keep-float", *keep)
    assert rc == 0, err
    got = torch.load(out, weights_only=False)
    assert type(got.conv2) is nn.Conv2d
    kept = [line.split()[0] for line in stdout.split("stayed float:")[1].splitlines()
            if "kept float by overrides" in line]
    assert sorted(kept) == sorted({"conv2", *(k for k in keep if "*" not in k)})
    ref = direct(env.net, ConvertConfig(overrides={k: None for k in keep}), env.x)
    assert torch.equal(run(got, env.x), run(ref, env.x))


def test_pickled_module_needs_trust_pickle(env, capsys, tmp_path):
    out = tmp_path / "p.pt"
    rc, stdout, err = cli(capsys, "convert", env.module, "--calib", env.data, "-o", out)
    assert rc == 2
    assert_one_error_line(err, "--trust-pickle", "run code", "--model-class")
    assert not out.exists()

    rc, stdout, err = cli(capsys, "convert", env.module, "--calib", env.data, "-o", out, "--trust-pickle")
    assert rc == 0, err
    ref = direct(env.net, ConvertConfig(), env.x)
    assert torch.equal(run(torch.load(out, weights_only=False), env.x), run(ref, env.x))


def test_pickled_module_error_in_subprocess_is_one_line(env):
    proc = subprocess.run([sys.executable, "-m", "torchlns", "report", str(env.module)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, "--trust-pickle")


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def test_report_table_and_json(env, capsys, tmp_path):
    rc, stdout, err = cli(capsys, "report", env.sd, "--model-class", f"{HELPER}:make")
    assert rc == 0, err
    assert re.search(r"^total\s", stdout, re.M) and "bn1" in stdout

    out = tmp_path / "q.pt"
    assert cli(capsys, "convert", env.sd, "--model-class", f"{HELPER}:make", "--calib", env.data, "-o", out)[0] == 0
    rc, stdout, err = cli(capsys, "report", out, "--trust-pickle")
    assert rc == 0, err
    q = torch.load(out, weights_only=False)
    assert stdout.rstrip("\n") == f"{torchlns.size_report(q)}\n\ncoverage:\n{q.conversion_report}"

    rc, stdout, err = cli(capsys, "report", out, "--trust-pickle", "--json")
    assert rc == 0, err
    got = json.loads(stdout)
    assert got["coverage"]["coverage"] == 1.0 and got["coverage"]["chip_macs"] == q.conversion_report.total_macs
    rows = got["size"]
    expected = torchlns.size_report(torch.load(out, weights_only=False))
    assert [r["layer"] for r in rows] == ["conv1", "conv2"]
    assert rows == json.loads(json.dumps(expected.to_dicts()))
    assert sum(r["bytes"] for r in rows) == expected.total_bytes


# ----------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------
def _numbers(stdout):
    found = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(": ")
        m = re.match(r"-?(?:[0-9.]+(?:e[-+]?\d+)?|inf)", value)
        if m:
            found[key] = float(m.group(0))
    return found


def test_compare_dense_with_targets(env, capsys, tmp_path):
    out = tmp_path / "q.pt"
    assert cli(capsys, "convert", env.sd, "--model-class", f"{HELPER}:make", "--calib", env.data,
               "-o", out, "--format", "fp8-e5m2")[0] == 0
    rc, stdout, err = cli(capsys, "compare", env.sd, out, "--model-class", f"{HELPER}:make",
                          "--data", env.labelled, "--trust-pickle")
    assert rc == 0, err
    got = _numbers(stdout)

    q = torch.load(out, weights_only=False)
    ref, y = run(env.net, env.x).double(), run(q, env.x).double()
    sqnr = 10 * math.log10(float((ref ** 2).sum()) / float(((y - ref) ** 2).sum()))
    agree = float((ref.argmax(1) == y.argmax(1)).double().mean())
    targets = torch.load(env.labelled)["targets"]
    assert got["samples"] == 40
    assert got["output SQNR"] == pytest.approx(sqnr, abs=5e-4)
    assert got["max abs difference"] == pytest.approx(float((y - ref).abs().max()), rel=1e-5)
    assert got["prediction agreement"] == pytest.approx(agree, abs=1e-6)
    assert got["pixel accuracy (float)"] == 1.0  # the targets are the float model's predictions
    assert got["pixel accuracy (converted)"] == pytest.approx(float((y.argmax(1) == targets).double().mean()),
                                                               abs=1e-6)
    assert 0 < agree < 1 and 5 < sqnr < 60


def test_compare_classifier_top1(env, capsys, tmp_path):
    out = tmp_path / "clf_q.pt"
    assert cli(capsys, "convert", env.clf_sd, "--model-class", f"{HELPER}:TinyClassifier", "--calib", env.data,
               "-o", out, "--format", "lns8-mitchell")[0] == 0
    rc, stdout, err = cli(capsys, "compare", env.clf_sd, out, "--model-class", f"{HELPER}:TinyClassifier",
                          "--data", env.labels, "--trust-pickle", "--batch-size", "7")
    assert rc == 0, err
    got = _numbers(stdout)
    ref, y = run(env.clf, env.x), run(torch.load(out, weights_only=False), env.x)
    c = compare_outputs(ref, y, torch.load(env.labels)["targets"])
    assert got["output SQNR"] == pytest.approx(c.sqnr_db, abs=5e-4)
    assert got["prediction agreement"] == pytest.approx(c.agreement, abs=1e-6)
    assert got["top-1 accuracy (float)"] == 1.0
    assert got["top-1 accuracy (converted)"] == pytest.approx(c.agreement, abs=1e-6)
    assert "pixel accuracy" not in stdout


def test_compare_identical_and_1d_outputs():
    ref = torch.randn(10)
    c = compare_outputs(ref, ref.clone())
    assert c.sqnr_db == math.inf and c.max_abs_diff == 0 and c.agreement is None
    noisy = ref + 0.01 * torch.randn(10)
    expected = 10 * math.log10(float((ref.double() ** 2).sum()) / float(((noisy - ref).double() ** 2).sum()))
    assert compare_outputs(ref, noisy).sqnr_db == pytest.approx(expected, rel=1e-12)


def test_compare_without_targets_omits_accuracy(env, capsys):
    rc, stdout, err = cli(capsys, "compare", env.module, env.sd, "--model-class", f"{HELPER}:make",
                          "--data", env.data, "--trust-pickle")
    assert rc == 0, err
    got = _numbers(stdout)
    assert got["output SQNR"] == math.inf and got["max abs difference"] == 0 and got["prediction agreement"] == 1
    assert "accuracy" not in stdout


# ----------------------------------------------------------------------------------------
# user errors: one line on stderr, status 2
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad(env):
    d = env.dir
    f = SimpleNamespace(
        text=d / "notes.txt", empty=d / "empty.pt", sd_missing=d / "missing_key.pt", sd_extra=d / "extra_key.pt",
        no_inputs=d / "no_inputs.pt", list_data=d / "list.pt", int_data=d / "int.pt", wrong_shape=d / "wrong.pt",
        bad_targets=d / "bad_targets.pt", converted_sd=d / "conv.state_dict.pt")
    f.text.write_text("not a torch file\n")
    f.empty.write_bytes(b"")
    sd = env.net.state_dict()
    torch.save({k: v for k, v in sd.items() if k != "conv2.bias"}, f.sd_missing)
    torch.save({**sd, "head.weight": torch.zeros(2)}, f.sd_extra)
    torch.save({"x": env.x}, f.no_inputs)
    torch.save([env.x], f.list_data)
    torch.save(torch.zeros(4, 3, 8, 8, dtype=torch.int64), f.int_data)
    torch.save(torch.randn(4, 5, 8, 8), f.wrong_shape)
    torch.save({"inputs": env.x, "targets": torch.zeros(40, 3, dtype=torch.long)}, f.bad_targets)
    torch.save(direct(env.net, ConvertConfig(), env.x).state_dict(), f.converted_sd)
    # a pickled module whose class's module is gone by the time it is loaded
    gone = d / "gone"
    gone.mkdir()
    (gone / "torchlns_cli_gone.py").write_text("import torch.nn as nn\n\nclass Gone(nn.Linear):\n    pass\n")
    sys.path.insert(0, str(gone))
    try:
        torch.save(__import__("torchlns_cli_gone").Gone(2, 2), d / "gone.pt")
    finally:
        sys.path.remove(str(gone))
        sys.modules.pop("torchlns_cli_gone", None)
    (gone / "torchlns_cli_gone.py").unlink()
    f.gone = d / "gone.pt"
    return f


def _error_cases():
    H = HELPER
    conv = lambda model, data, *more: ["convert", model, "--calib", data, "-o", "{tmp}/o.pt", *more]  # noqa: E731
    mc = ["--model-class", f"{H}:make"]
    return {
        "missing model file": (conv("{dir}/nope.pt", "{data}", *mc), "not found"),
        "model is a directory": (["report", "{dir}"], "directory"),
        "model not a torch file": (["report", "{text}"], "not a torch file"),
        "model empty file": (["report", "{empty}", *mc], "not a torch file"),
        "state_dict without --model-class": (["report", "{sd}"], "--model-class"),
        "state_dict missing key": (["report", "{sd_missing}", *mc], "missing keys: conv2.bias"),
        "state_dict unexpected key": (["report", "{sd_extra}", *mc], "unexpected keys: head.weight"),
        "state_dict shape mismatch": (["report", "{sd}", "--model-class", f"{H}:make_wide"], "shape mismatch"),
        "model-class module missing": (["report", "{sd}", "--model-class", "no_such_pkg.mod:Net"], "cannot import"),
        "model-class attribute missing": (["report", "{sd}", "--model-class", f"{H}:Nope"], "no attribute"),
        "model-class without colon": (["report", "{sd}", "--model-class", H], "pkg.module:callable"),
        "model-class needs arguments": (["report", "{sd}", "--model-class", f"{H}:needs_args"], "no arguments"),
        "model-class not callable": (["report", "{sd}", "--model-class", f"{H}:NOT_CALLABLE"], "not a class"),
        "model file holds a tensor": (["report", "{data}"], "holds a Tensor"),
        "pickled module untrusted": (["report", "{module}"], "--trust-pickle"),
        "trusted pickle, class not importable": (["report", "{gone}", "--trust-pickle"], "cannot be imported"),
        "converted state_dict alone": (["report", "{converted_sd}"], "converted model's state_dict"),
        "missing data file": (conv("{sd}", "{dir}/nodata.pt", *mc), "DATA file not found"),
        "data not a torch file": (conv("{sd}", "{text}", *mc), "not a torch file"),
        "data dict without inputs": (conv("{sd}", "{no_inputs}", *mc), "'inputs'"),
        "data is a list": (conv("{sd}", "{list_data}", *mc), "holds a list"),
        "data is a pickled module": (conv("{sd}", "{module}", *mc), "pickled Python objects"),
        "data not float": (conv("{sd}", "{int_data}", *mc), "float tensor"),
        "data shape mismatch": (conv("{sd}", "{wrong_shape}", *mc), "fails on a data batch of shape (4, 5, 8, 8)"),
        "keep-float matches nothing": (conv("{sd}", "{data}", *mc, "--keep-float", "fc*"), "matches no layer"),
        "output directory missing": (["convert", "{sd}", "--calib", "{data}", "-o", "{tmp}/no/dir/o.pt", *mc],
                                     "does not exist"),
        "cluster-scope without cluster": (conv("{sd}", "{data}", *mc, "--cluster-scope", "network"), "--cluster"),
        "compare converted state_dict": (["compare", "{sd}", "{converted_sd}", "--data", "{data}", *mc],
                                         "converted model's state_dict"),
        "compare targets mismatch": (["compare", "{sd}", "{sd}", "--data", "{bad_targets}", *mc], "targets"),
        "compare missing data": (["compare", "{sd}", "{sd}", "--data", "{dir}/nodata.pt", *mc], "not found"),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_user_errors_are_one_line_exit_2(env, bad, capsys, tmp_path, case):
    argv, needle = _error_cases()[case]
    paths = {**{k: str(v) for k, v in vars(bad).items()}, "dir": str(env.dir), "data": str(env.data),
             "sd": str(env.sd), "module": str(env.module), "tmp": str(tmp_path)}
    rc, stdout, err = cli(capsys, *[a.format(**paths) for a in argv])
    assert rc == 2
    assert_one_error_line(err, needle)
    assert not (tmp_path / "o.pt").exists()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "m.pt", "--calib", "d.pt", "-o", "o.pt", "--format", "lns4"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_and_formats_still_registered():
    args = build_parser().parse_args(["demo", "--clusters", "8", "--seed", "3"])
    assert args.command == "demo" and args.clusters == 8 and args.seed == 3
    assert args.func.__name__ == "_cmd_demo"
    args = build_parser().parse_args(["formats", "--n", "64"])
    assert args.func.__name__ == "_cmd_formats" and args.n == 64


# ----------------------------------------------------------------------------------------
# export and cost
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(env, tmp_path_factory):
    d = tmp_path_factory.mktemp("converted")
    out = d / "q.pt"
    rc = main(["convert", str(env.sd), "--model-class", f"{HELPER}:make", "--calib", str(env.data), "-o", str(out),
               "--format", "lns8-chip", "--image", str(d / "q.tlns")])
    assert rc == 0
    return out, d / "q.tlns"


def test_export_writes_the_image_the_size_report_counts(env, converted, capsys, tmp_path):
    from torchlns.deploy.image import HEADER_BYTES

    out, _ = converted
    image = tmp_path / "q.tlns"
    rc, stdout, err = cli(capsys, "export", out, "--trust-pickle", "-o", image)
    assert rc == 0, err
    q = torch.load(out, weights_only=False)
    payload = math.ceil(torchlns.size_report(q).total_bytes)
    manifest = len(image.read_bytes()) - HEADER_BYTES - payload
    assert f"wrote {image}: {image.stat().st_size:,} bytes = {HEADER_BYTES} header + {manifest:,} manifest + " \
           f"{payload:,} payload" in stdout
    assert manifest == len(json.dumps(torchlns.read_manifest(image), separators=(",", ":")).encode())
    back = torchlns.load_image(image, env.helper.make())
    assert torch.equal(run(back, env.x), run(q, env.x))


def test_convert_image_equals_export(converted, capsys, tmp_path):
    out, image = converted
    again = tmp_path / "again.tlns"
    assert cli(capsys, "export", out, "--trust-pickle", "-o", again)[0] == 0
    assert again.read_bytes() == image.read_bytes()


@pytest.mark.parametrize("argv, needles", [
    (["export", "{q}", "-o", "{tmp}/x.tlns"], ["--trust-pickle"]),
    (["export", "{q}", "--trust-pickle", "-o", "{tmp}"], ["is a directory"]),
    (["export", "{q}", "--trust-pickle", "-o", "{tmp}/nowhere/x.tlns"], ["does not exist"]),
    (["export", "{q}", "--trust-pickle", "-o", "{q}"], ["would overwrite"]),
    (["cost", "{q}", "--trust-pickle"], ["--input-shape"]),
    (["cost", "{q}", "--trust-pickle", "--compare", "--input-shape", "1,3,8,8"], ["--calib"]),
    (["cost", "{q}", "--trust-pickle", "--clusters", "4", "--input-shape", "1,3,8,8"], ["--compare"]),
    (["cost", "{q}", "--trust-pickle", "--input-shape", "1,5,8,8"], ["MODEL"]),
])
def test_export_and_cost_user_errors(converted, capsys, tmp_path, argv, needles):
    out, _ = converted
    args = [a.format(q=out, tmp=tmp_path) for a in argv]
    rc, _, err = cli(capsys, *args)
    assert rc == 2
    assert_one_error_line(err, *needles)


def test_cost_of_a_converted_model(env, converted, capsys):
    out, _ = converted
    rc, stdout, err = cli(capsys, "cost", out, "--trust-pickle", "--input-shape", "1,3,8,8", "--chip", "micro")
    assert rc == 0, err
    q = torch.load(out, weights_only=False)
    x = torch.rand((1, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    report = torchlns.cost_report(q, x, torchlns.CHIPS["micro"])
    assert str(report) in stdout
    assert report.macs == 64 * (8 * 3 * 9 + 4 * 8 * 9)

    rc, stdout, err = cli(capsys, "cost", out, "--trust-pickle", "--calib", env.data, "--json",
                          "--weight-sram-kib", "0")
    assert rc == 0, err
    got = json.loads(stdout)
    assert got["chip"] == "edge (modified)" and got["totals"]["weights_fit"] is False
    assert got["totals"]["dram_bytes"] == pytest.approx(torchlns.size_report(q).total_bytes)
    assert [r["layer"] for r in got["layers"]] == ["conv1", "conv2"]


def test_cost_compare_every_format(env, capsys):
    rc, stdout, err = cli(capsys, "cost", env.sd, "--model-class", f"{HELPER}:make", "--compare", "--calib",
                          env.data, "--clusters", "4", "--json")
    assert rc == 0, err
    rows = {r["model"]: r for r in json.loads(stdout)["models"]}
    assert list(rows) == ["float32 (BN folded)", "FP8 e4m3", "INT8", "LNS8 chip", "LNS8 chip + cluster C=4"]
    assert len({r["macs"] for r in rows.values()}) == 1
    assert rows["LNS8 chip + cluster C=4"]["weight_bytes"] < rows["LNS8 chip"]["weight_bytes"] \
        < rows["float32 (BN folded)"]["weight_bytes"]
    e = {n: rows[n]["energy_mac_pj"] for n in rows}
    macs = rows["INT8"]["macs"]
    # float32 4.6 pJ > FP8 1.1 > the chip preset's LNS datapath 0.378 (its 32-bit shifter and saturation) > INT8 0.3
    assert [round(e[n] / macs, 3) for n in ("float32 (BN folded)", "FP8 e4m3", "LNS8 chip", "INT8")] == \
        [4.6, 1.1, 0.378, 0.3]

    rc, stdout, err = cli(capsys, "cost", env.sd, "--model-class", f"{HELPER}:make", "--compare", "--calib",
                          env.data, "--max-batches", "1")
    assert rc == 0, err
    assert "LNS8 chip + cluster C=16" in stdout and "TOPS/W" in stdout and "chip: edge" in stdout


def test_cost_of_a_model_with_a_dict_output(env, capsys):
    rc, stdout, err = cli(capsys, "cost", env.sd, "--model-class", f"{HELPER}:make_dict", "--input-shape", "2,3,8,8",
                          "--json")
    assert rc == 0, err
    assert json.loads(stdout)["totals"]["macs"] == 2 * 64 * (8 * 3 * 9 + 4 * 8 * 9)
