"""The bad-input catalogue, through the CLI: every case exits 1 (a runtime problem) or 2 (a usage
problem) with one line naming the problem and the path, never a traceback, and leaves no
half-written files behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy
import pytest

from charnn.io import checkpoint

from archive_support import BOMB_BYTES, Member, npy, npy_header, st_bytes, st_layout, zip_bytes
from cli_support import (TINY, check_error, check_ok, corpus_text, invoke, temp_files, time_limit, train,
                         write_corpus)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small trained model file, never modified (tests copy it)."""
    folder = tmp_path_factory.mktemp("model")
    corpus = write_corpus(folder)
    check_ok(train(corpus, folder / "run", "--max-steps", 3))
    return folder / "run" / "model.npz"


def refuse_train(tmp_path, corpus, *needles, code=1, extra=()):
    """Training on ``corpus`` fails with one line holding the needles and writes nothing."""
    out = tmp_path / "out"
    msg = check_error(train(corpus, out, "--max-steps", 3, *extra), code, *needles)
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return msg


def use_model(path, *needles):
    """sample and score both refuse the model file at ``path`` with one line naming it."""
    text = path.parent / "lines.txt"
    text.write_text("the cat\n")
    for args in (["sample", path, "-n", 5], ["score", path, text]):
        r = invoke(*args, "--device", "cpu")
        check_error(r, 1, str(path), *needles)
        assert r.stdout == ""


def rewrite(src, dst, edit):
    """Copy the model file ``src`` to ``dst`` through ``edit(arrays, meta)`` (plain numpy.savez)."""
    with numpy.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
    edit(arrays, meta)
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode("utf-8"), dtype=numpy.uint8)
    numpy.savez(dst, **arrays)
    return dst


# ----- corpora -----

def test_missing_corpus(tmp_path):
    missing = tmp_path / "nope.txt"
    refuse_train(tmp_path, missing, str(missing), "no such file")


def test_corpus_is_a_directory(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    refuse_train(tmp_path, folder, str(folder), "directory")


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refuse_train(tmp_path, empty, str(empty), "empty")


@pytest.mark.parametrize("text, needle", [("ab", "too short"), ("the cat sat\n" * 3, "too few")])
def test_corpus_shorter_than_one_batch(tmp_path, text, needle):
    short = tmp_path / "short.txt"
    short.write_text(text)
    refuse_train(tmp_path, short, str(short), needle)


def test_binary_corpus(tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary" * 200)
    refuse_train(tmp_path, binary, str(binary), "binary", "NUL")


def test_invalid_utf8_says_where_and_what_to_do(tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes(corpus_text(60).encode() + "café crème\n".encode("latin-1") + corpus_text(60, 1).encode())
    offset = len(corpus_text(60).encode()) + 3
    msg = refuse_train(tmp_path, bad, str(bad), f"byte {offset}", "line 61", "--encoding", "--errors replace")
    assert "utf-8" in msg
    out = tmp_path / "out"
    check_ok(train(bad, out, "--max-steps", 3, "--errors", "replace"))
    assert "\ufffd" in checkpoint.load(out / "model.npz").vocab.tokens
    check_ok(train(bad, tmp_path / "latin1", "--max-steps", 3, "--encoding", "latin-1"))
    assert "é" in checkpoint.load(tmp_path / "latin1" / "model.npz").vocab.tokens


def test_unknown_encoding(tmp_path):
    corpus = write_corpus(tmp_path)
    refuse_train(tmp_path, corpus, "--encoding", "unknown encoding", "klingon", code=2, extra=("--encoding", "klingon"))


def test_byte_order_mark_is_stripped(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + corpus_text().encode())
    plain = write_corpus(tmp_path)
    check_ok(train(bom, tmp_path / "a", "--max-steps", 3))
    check_ok(train(plain, tmp_path / "b", "--max-steps", 3))
    a, b = checkpoint.load(tmp_path / "a" / "model.npz"), checkpoint.load(tmp_path / "b" / "model.npz")
    assert "\ufeff" not in a.vocab.tokens and a.vocab.tokens == b.vocab.tokens
    for k in a.params:
        numpy.testing.assert_array_equal(a.params[k], b.params[k])  # the same text, the same run


def test_windows_line_endings_are_normalised(tmp_path, model):
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(corpus_text().replace("\n", "\r\n").encode())
    out = tmp_path / "out"
    check_ok(train(crlf, out, "--max-steps", 3))
    assert "\r" not in checkpoint.load(out / "model.npz").vocab.tokens
    lf, crlf_lines = tmp_path / "lf.txt", tmp_path / "crlf_lines.txt"
    lf.write_bytes(b"the cat\na dog\n")
    crlf_lines.write_bytes(b"the cat\r\na dog\r\n")
    scores = [invoke("score", model, f, "--format", "jsonl", "--device", "cpu") for f in (lf, crlf_lines)]
    assert check_ok(scores[0]).stdout == check_ok(scores[1]).stdout


def test_one_repeated_character(tmp_path):
    same = tmp_path / "aaaa.txt"
    same.write_text("a" * 3000)
    refuse_train(tmp_path, same, str(same), "single distinct")


def test_word_corpus_without_words(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n" * 500)
    refuse_train(tmp_path, blank, str(blank), "no words", extra=("--level", "word"))
    corpus = write_corpus(tmp_path)
    refuse_train(tmp_path, corpus, str(corpus), "no words", extra=("--level", "word", "--min-count", "100000"))


def test_score_input_problems(tmp_path, model):
    missing = tmp_path / "missing.txt"
    check_error(invoke("score", model, missing, "--device", "cpu"), 1, str(missing), "no such file")
    check_error(invoke("score", model, tmp_path, "--device", "cpu"), 1, str(tmp_path), "directory")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the cat\n\xff\xfe\n")
    check_error(invoke("score", model, bad, "--device", "cpu"), 1, str(bad), "byte 8", "line 2")
    r = check_ok(invoke("score", model, bad, "--errors", "replace", "--format", "jsonl", "--device", "cpu"))
    assert "left out" in r.stderr


# ----- model files -----

def test_model_path_that_is_not_a_model(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just some notes\n")
    use_model(text, "not a charnn model file")
    plain = tmp_path / "plain.npz"
    numpy.savez(plain, a=numpy.zeros(3))
    use_model(plain, "not a charnn model file")


def test_missing_model_and_empty_folder(tmp_path):
    use_model(tmp_path / "gone.npz", "no such file")
    folder = tmp_path / "run"
    folder.mkdir()
    use_model(folder, "holds no model.npz")


def test_truncated_model(tmp_path, model):
    data = model.read_bytes()
    for n in (10, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{n}.npz"
        cut.write_bytes(data[:n])
        use_model(cut, "truncated")


def test_newer_format_version(tmp_path, model):
    def edit(arrays, meta):
        meta["version"] = checkpoint.VERSION + 1
    use_model(rewrite(model, tmp_path / "future.npz", edit), "newer charnn", "upgrade")


class Payload:
    """Unpickling this would create a file; charnn must never unpickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_object_is_refused_and_never_run(tmp_path, model):
    marker = tmp_path / "pwned"

    def edit(arrays, meta):
        arrays["param/evil"] = numpy.array([Payload(str(marker))], dtype=object)
    path = rewrite(model, tmp_path / "evil.npz", edit)
    use_model(path, "pickled")
    assert not marker.exists()


def test_tampered_shapes(tmp_path, model):
    def edit(arrays, meta):
        arrays["param/head.W"] = arrays["param/head.W"][:, :-1]
    use_model(rewrite(model, tmp_path / "shapes.npz", edit), "head.W", "shape")


def test_vocabulary_that_does_not_match_the_weights(tmp_path, model):
    def edit(arrays, meta):
        meta["vocab"]["tokens"] = meta["vocab"]["tokens"][:-1]
    use_model(rewrite(model, tmp_path / "vocab.npz", edit), "vocabulary", "tokens")


def test_crafted_layer_count_does_not_hang(tmp_path, model):
    """A file claiming 10**12 layers was looped over while checking its parameters."""
    def edit(arrays, meta):
        meta["config"]["layers"] = 10**12
    with time_limit(20):
        use_model(rewrite(model, tmp_path / "layers.npz", edit), "layers")


def test_member_that_is_not_an_array(tmp_path, model):
    """A zip member without the .npy magic is given back by NumPy as bytes, not an array."""
    import zipfile

    path = tmp_path / "bytes.npz"
    with zipfile.ZipFile(model) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name) if name != "param/head.b.npy" else b"not an array")
    use_model(path, "param/head.b")


def model_parts(model):
    """(meta, members) of the model file ``model``, as archive_support members."""
    with numpy.load(model) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    return meta, [Member(f"{k}.npy", npy(v)) for k, v in arrays.items()]


def with_meta(raw: bytes) -> Member:
    return Member("meta.npy", npy_header("|u1", (len(raw),)) + raw)


def version(v):
    def edit(meta, members):
        meta["version"] = v
        return [with_meta(json.dumps(meta).encode())] + members
    return edit


def meta_tail(tail: str):
    def edit(meta, members):
        return [with_meta((json.dumps(meta)[:-1] + ", " + tail + "}").encode())] + members
    return edit


def huge_head_w(meta, members):
    head = npy_header("<f4", (meta["config"]["vocab_size"], 2**28))
    return [with_meta(json.dumps(meta).encode())] + [
        Member.bomb(m.name, head, size=len(head) + 4 * meta["config"]["vocab_size"] * 2**28)
        if m.name == "param/head.W.npy" else m for m in members]


def extra_member(name):
    def edit(meta, members):
        return [with_meta(json.dumps(meta).encode())] + members + [
            Member.bomb(name, npy_header("<f8", (2**28,)), size=2**31)]
    return edit


def huge_meta(meta, members):
    head = json.dumps(meta)[:-1] + ', "notes": "'
    return [Member.bomb("meta.npy", npy_header("|u1", (len(head) + BOMB_BYTES,)) + head.encode())] + members


def bzip2_member(meta, members):
    first = Member(members[0].name, members[0].data, 12)  # data as stored: plain
    return [with_meta(json.dumps(meta).encode()), first] + members[1:]


BAD_FILES = [
    ("version 0", version(0), ["unknown model format version 0"]),
    ("version -1", version(-1), ["unknown model format version -1"]),
    ("version true", version(True), ["format version is true"]),
    ("5,000-digit integer", meta_tail('"step": ' + "7" * 5000), ["malformed metadata"]),
    ("deep nesting", meta_tail('"x": ' + "[" * 100_000 + "]" * 100_000), ["malformed metadata"]),
    ("30,000 empty lists", meta_tail('"x": [' + "[]," * 30_000 + "[]]"), ["malformed metadata", "lists and objects"]),
    ("head.W inflating to GiBs", huge_head_w, ["head.W", "shape"]),
    ("unknown 2 GiB member", extra_member("blob.npy"), ["unexpected member", "blob.npy"]),
    ("path traversal", extra_member("../../escape.npy"), ["unexpected member", "escape.npy"]),
    ("256 MiB of metadata", huge_meta, ["malformed metadata"]),
    ("bzip2 member", bzip2_member, ["compression"]),
]


@pytest.mark.parametrize("make, needles", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_crafted_model_files(tmp_path, model, make, needles):
    """sample, score, gradcheck and a run folder holding the file: exit 1, one line, quickly."""
    meta, members = model_parts(model)
    path = tmp_path / "crafted.npz"
    path.write_bytes(zip_bytes(make(meta, members)))
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model.npz").write_bytes(path.read_bytes())
    with time_limit(60):
        use_model(path, *needles)
        check_error(invoke("gradcheck", path, "--device", "cpu"), 1, str(path), *needles)
        r = invoke("sample", folder, "-n", 5, "--device", "cpu")
        check_error(r, 1, str(folder / "model.npz"), *needles)
        assert r.stdout == ""


# ----- safetensors files: held to the same bounds, in processes with a memory cap -----

CAPPED_CHILD = """
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from click.testing import CliRunner
from charnn.cli import cli
results = []
for args in json.loads(sys.argv[2]):
    r = CliRunner().invoke(cli, args, input="the cat\\n")
    crash = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)[:300]
    results.append([r.exit_code, r.stderr, crash])
print(json.dumps(results))
"""
CAP = 1536 << 20  # the child's address space: the import baseline is about 500 MB


def capped(*commands, timeout=120) -> list:
    """Each command (a list of arguments) in one child process whose address space is capped
    (RLIMIT_AS): a file that made charnn grow without limit fails the test with a MemoryError
    there instead of taking the machine down. [exit code, stderr, unexpected exception] each."""
    argv = json.dumps([[str(a) for a in c] for c in commands])
    proc = subprocess.run([sys.executable, "-c", CAPPED_CHILD, str(CAP), argv], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def every_model_command(path, tmp_path):
    """The commands that read a model file, as argument lists."""
    corpus = write_corpus(tmp_path)
    return [["info", path], ["sample", path, "-n", 5, "--device", "cpu"], ["score", path, "-", "--device", "cpu"],
            ["gradcheck", path, "--device", "cpu"], ["export", path, tmp_path / "x.safetensors"],
            ["train", corpus, "--init-from", path, "--out", tmp_path / "ft", *TINY, "--max-steps", 2]]


def refused_by_every_command(path, tmp_path, *needles):
    for (code, err, crash), args in zip(capped(*every_model_command(path, tmp_path)), every_model_command(path, tmp_path)):
        assert crash is None, (args, crash)
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert code == 1 and len(errors) == 1 and "Traceback" not in err, (args, code, err)
        for needle in (str(path),) + needles:
            assert needle in errors[0], (args, needle, errors[0])
    assert not (tmp_path / "ft").exists() and not (tmp_path / "x.safetensors").exists()


def model_as_safetensors(model, edit_metadata=None, edit_tensors=None):
    """(header, data) of ``model`` (an npz) as export would write it, after the edits."""
    from charnn.io import safetensors_file

    ckpt = checkpoint.load(model)
    metadata = {"format": "pt", "charnn.config": json.dumps(ckpt.config.to_json()),
                "charnn.vocab": json.dumps(ckpt.vocab.to_json()), "charnn.meta": json.dumps({"progress": {"step": 3}})}
    tensors = safetensors_file.to_torch(ckpt.config, ckpt.params)
    if edit_metadata:
        edit_metadata(metadata)
    if edit_tensors:
        edit_tensors(tensors)
    return st_layout(tensors, metadata)


def test_a_safetensors_file_claiming_a_billion_layers(tmp_path, model):
    """The issue's 28 KB file grew every command to 9.7 GB in a minute; the same .npz was refused at once."""
    def edit(md):
        md["charnn.config"] = json.dumps(dict(json.loads(md["charnn.config"]), layers=10**9))
    path = tmp_path / "layers.safetensors"
    path.write_bytes(st_bytes(*model_as_safetensors(model, edit)))
    assert path.stat().st_size < 64 << 10
    refused_by_every_command(path, tmp_path, "1,000,000,000 layers")


def test_safetensors_metadata_of_many_lists(tmp_path, model):
    """A header whose charnn.meta held 1.3 million empty lists loaded with exit 0 (and a 60 MB
    header cost 1.6 GB); the npz loader's cap on lists and objects holds for it too."""
    def edit(md):
        md["charnn.meta"] = '{"x": [' + "[]," * 1_300_000 + "[]]}"
    path = tmp_path / "lists.safetensors"
    path.write_bytes(st_bytes(*model_as_safetensors(model, edit)))
    refused_by_every_command(path, tmp_path, "charnn.meta", "lists and objects")


def test_an_unknown_safetensors_tensor_is_never_read(tmp_path, model):
    """400 MB of an unknown tensor cost 820 MB before "unexpected tensors"; 1.2 GB of one (a
    sparse file: no disk used) would pass the child's memory cap."""
    header, data = model_as_safetensors(model)
    n = 300_000_000
    header["junk"] = {"dtype": "F32", "shape": [n], "data_offsets": [len(data), len(data) + 4 * n]}
    path = tmp_path / "junk.safetensors"
    path.write_bytes(st_bytes(header, data))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + 4 * n)
    refused_by_every_command(path, tmp_path, "unexpected tensors: junk")


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_a_weight_finite_in_float64_but_not_in_float32(tmp_path, model, fmt):
    """1e300: score said nan and exited 0, sample printed zzzz, score --tokens raised
    StopIteration from the heat map. Every command refuses the file in one line naming the
    weight; gradcheck, which computes in float64, checks it."""
    path = tmp_path / f"big.{fmt}"
    if fmt == "npz":
        def edit(arrays, meta):
            arrays["param/rnn.0.Wh"] = arrays["param/rnn.0.Wh"].astype(numpy.float64)
            arrays["param/rnn.0.Wh"][0, 0] = 1e300
        rewrite(model, path, edit)
        name = "parameter rnn.0.Wh"
    else:
        def edit(tensors):
            tensors["rnn.weight_hh_l0"] = tensors["rnn.weight_hh_l0"].astype(numpy.float64)
            tensors["rnn.weight_hh_l0"][0, 0] = 1e300
        path.write_bytes(st_bytes(*model_as_safetensors(model, edit_tensors=edit)))
        name = "tensor rnn.weight_hh_l0"
    text = tmp_path / "lines.txt"
    text.write_text("the cat\n")
    for args in (["score", path, text], ["score", path, text, "--tokens"], ["score", path, text, "--document"],
                 ["sample", path, "-n", 5], ["info", path], ["export", path, tmp_path / "x.safetensors"]):
        r = invoke(*args, *(["--device", "cpu"] if args[0] in ("score", "sample") else []))
        check_error(r, 1, str(path), f"{name} holds 1e+300, beyond the range of float32")
        assert r.stdout == ""
    assert checkpoint.load(path, "float64").params["rnn.0.Wh"][0, 0] == 1e300


def test_dynamic_evaluation_that_diverges_is_one_line(tmp_path, model):
    """--dynamic-lr 1e308 made the adapted weights infinite: a table of nan, or with --tokens
    the heat map's StopIteration traceback."""
    folder = model.parent.parent
    text = tmp_path / "doc.txt"
    text.write_text(corpus_text(20, seed=3))
    for extra in ([], ["--tokens"], ["--format", "jsonl"]):
        r = invoke("score", model, text, "--document", "--dynamic", "--dynamic-lr", "1e308",
                   "--dynamic-stats", folder / "corpus.txt", "--device", "cpu", *extra)
        check_error(r, 1, "dynamic evaluation diverged", "learning rate 1e+308")
        assert r.stdout == ""


def test_the_heat_map_shows_a_surprisal_that_is_not_a_number():
    from charnn.cli.score import HEAT, heat_text

    shown = heat_text(["a", "b", "c", "d"], [0.5, float("nan"), float("inf"), 3.0], "char")
    styles = [str(span.style) for span in shown.spans]
    assert shown.plain == "abcd" and styles == [f"on {HEAT[-1][1]}", f"on {HEAT[-1][1]}", f"on {HEAT[2][1]}"]


# ----- option values (usage errors, exit 2) -----

@pytest.mark.parametrize("args, option", [
    (["train", "C", "--hidden", "-4"], "--hidden"),
    (["train", "C", "--layers", "0"], "--layers"),
    (["train", "C", "--batch-size", "0"], "--batch-size"),
    (["train", "C", "--seq-len", "0"], "--seq-len"),
    (["train", "C", "--embed", "-1"], "--embed"),
    (["train", "C", "--dropout", "1"], "--dropout"),
    (["train", "C", "--lr", "-0.1"], "--lr"),
    (["train", "C", "--max-steps", "0"], "--max-steps"),
    (["train", "C", "--val-fraction", "1.5"], "--val-fraction"),
    (["train", "C", "--tie", "--embed", "8", "--hidden", "16"], "--tie"),
    (["train", "C", "--lr-schedule", "linear"], "--lr-schedule"),
    (["train", "C", "--lr-floor", "1.5"], "--lr-floor"),
    (["train", "C", "--lr-floor", "nan"], "--lr-floor"),
    (["train", "C", "--warmup", "-1"], "--warmup"),
    (["train", "C", "--lr-hold", "1"], "--lr-hold"),
    (["train", "C", "--lr-hold", "-0.5"], "--lr-hold"),
    (["train", "C", "--weight-decay", "-1"], "--weight-decay"),
    (["train", "C", "--weight-decay", "0.1", "--optimizer", "sgd"], "--weight-decay"),
    (["train", "C", "--weight-decay", "400"], "--weight-decay"),
    (["train", "C", "--weight-drop", "1"], "--weight-drop"),
    (["train", "C", "--weight-drop", "-0.2"], "--weight-drop"),
    (["train", "C", "--weight-drop", "nan"], "--weight-drop"),
    (["train", "C", "--input-scale", "-1"], "--input-scale"),
    (["train", "C", "--input-scale", "nan"], "--input-scale"),
    (["train", "C", "--embed", "4", "--input-scale", "0.5"], "--input-scale"),
    (["train", "C", "--cell", "gru", "--activation", "relu"], "--activation"),  # the registry says which cells take it
    (["train", "C", "--cell", "lstm", "--activation", "relu"], "--activation"),
    (["sample", "M", "--temperature", "-1"], "--temperature"),
    (["sample", "M", "--top-p", "0"], "--top-p"),
    (["sample", "M", "--top-p", "1.5"], "--top-p"),
    (["sample", "M", "--top-k", "0"], "--top-k"),
    (["sample", "M", "--length", "-5"], "--length"),
    (["sample", "M", "--num-samples", "0"], "--num-samples"),
    (["sample", "M", "--beam-size", "0"], "--beam-size"),
    (["score", "M", "F", "--batch-size", "0"], "--batch-size"),
    (["score", "M", "F", "X"], "at most"),
])
def test_nonsense_option_values(tmp_path, model, args, option):
    corpus = write_corpus(tmp_path)
    args = [{"C": corpus, "M": model, "F": corpus, "X": corpus}.get(a, a) for a in args]
    if args[0] == "train":
        args += ["--out", tmp_path / "out"]
    check_error(invoke(*args), 2, option)
    assert not (tmp_path / "out").exists()


# ----- output -----

def test_output_folder_under_a_file(tmp_path):
    corpus = write_corpus(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("in the way")
    check_error(invoke("train", corpus, "--out", blocker / "sub", *TINY, "--max-steps", 3), 1,
                str(blocker / "sub"), "cannot create the run folder")
    assert blocker.read_text() == "in the way"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path):
    corpus = write_corpus(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        check_error(invoke("train", corpus, "--out", locked / "run", *TINY, "--max-steps", 3), 1, str(locked / "run"))
    finally:
        locked.chmod(0o700)


class FullDisk:
    """A file whose writes stop halfway with ENOSPC, as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_during_save(tmp_path, monkeypatch):
    """The disk fills up at the second evaluation's save: a clear message naming the file, and the
    first evaluation's checkpoints are still whole; no temporary file is left."""
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    real_fdopen = os.fdopen
    opened = []

    def fdopen(fd, *args, **kw):
        f = real_fdopen(fd, *args, **kw)
        opened.append(fd)
        # 1: the token cache, 2-3: the first evaluation's model.npz and last.npz
        return FullDisk(f) if len(opened) >= 4 else f

    monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)
    check_error(train(corpus, out, "--max-steps", 20, "--eval-every", 5), 1, str(out / "model.npz"),
                "No space left on device")
    monkeypatch.undo()
    for name in ("model.npz", "last.npz"):
        assert checkpoint.load(out / name).meta["progress"]["step"] == 5
    assert temp_files(out) == []


# ----- the catalogue: everything a user types or pipes in (issue 17, classes 3, 7 and 8) -----

def one_message(result, code: int, *needles: str):
    """check_error, stricter: besides click's usage lines (exit 2), stderr holds exactly one
    line, the "Error:" line, and nothing went to stdout."""
    msg = check_error(result, code, *needles)
    other = [line for line in result.stderr.splitlines()
             if line.strip() and line != msg and not line.startswith(("Usage:", "Try "))]
    assert other == [], result.stderr
    assert result.stdout == ""
    return msg


FIFO, UTF8_BAD = "FIFO", b"hidden = 8\n# caf\xe9\n"
# (command line, files to create {placeholder: bytes, or FIFO}, exit code, needles of the message).
# C: a corpus, M: the model, F: a text file; other placeholders are created from the table.
CATALOGUE = [
    # 3. hangs: FIFOs where a file is read more than once or by np.load; NaN and infinities
    (["train", "P"], {"P": FIFO}, 1, ["P", "FIFO", "not a regular file"]),
    (["train", "C", "--val", "P"], {"P": FIFO}, 1, ["P", "FIFO"]),
    (["train", "C", "--config", "P"], {"P": FIFO}, 2, ["--config", "FIFO"]),
    (["sample", "P"], {"P": FIFO}, 1, ["P", "FIFO", "model file"]),
    (["score", "P", "F"], {"P": FIFO}, 1, ["P", "FIFO", "model file"]),
    (["gradcheck", "P"], {"P": FIFO}, 1, ["P", "FIFO", "model file"]),
    (["gradcheck", "M", "--text", "P"], {"P": FIFO}, 1, ["P", "FIFO"]),
    (["train", "C", "--time-limit", "nan"], {}, 2, ["--time-limit", "finite"]),
    (["train", "C", "--time-limit", "inf"], {}, 2, ["--time-limit", "finite"]),
    (["train", "C", "--lr", "nan"], {}, 2, ["--lr", "finite"]),
    (["train", "C", "--lr", "inf"], {}, 2, ["--lr", "finite"]),
    (["train", "C", "--lr-decay", "nan"], {}, 2, ["--lr-decay", "finite"]),
    (["train", "C", "--clip", "nan"], {}, 2, ["--clip", "finite"]),
    (["train", "C", "--clip", "inf"], {}, 2, ["--clip", "finite"]),
    (["train", "C", "--dropout", "nan"], {}, 2, ["--dropout", "finite"]),
    (["train", "C", "--state-reset", "nan"], {}, 2, ["--state-reset", "finite"]),
    (["train", "C", "--val-fraction", "nan"], {}, 2, ["--val-fraction", "finite"]),
    (["train", "C", "--val-fraction", "-inf"], {}, 2, ["--val-fraction"]),
    (["sample", "M", "--temperature", "nan"], {}, 2, ["--temperature", "finite"]),
    (["sample", "M", "--temperature", "inf"], {}, 2, ["--temperature", "finite"]),
    (["sample", "M", "--top-p", "nan"], {}, 2, ["--top-p", "finite"]),
    (["gradcheck", "--dropout", "nan"], {}, 2, ["--dropout", "finite"]),
    (["gradcheck", "--tolerance", "nan"], {}, 2, ["--tolerance", "finite"]),
    (["gradcheck", "--tolerance", "inf"], {}, 2, ["--tolerance", "finite"]),
    # 7. tracebacks: seeds, escapes, codecs, config files
    (["train", "C", "--seed", "-1"], {}, 2, ["--seed"]),
    (["sample", "M", "--seed", "-1"], {}, 2, ["--seed"]),
    (["gradcheck", "--seed", "-1"], {}, 2, ["--seed"]),
    (["sample", "M", "--prime", "\\"], {}, 2, ["--prime", "malformed escape"]),
    (["sample", "M", "--stop-at", "\\"], {}, 2, ["--stop-at", "malformed escape"]),
    (["sample", "M", "--prime", "ab\\x4"], {}, 2, ["--prime", "malformed escape"]),
    (["sample", "M", "--stop-at", "\\N{NO SUCH NAME}"], {}, 2, ["--stop-at", "malformed escape"]),
    (["sample", "M", "--prime", "\\ud800"], {}, 2, ["--prime", "not valid text"]),
    (["sample", "M", "--prime", "\udcff"], {}, 2, ["--prime", "not valid text"]),  # undecodable argv bytes
    (["train", "C", "--encoding", "rot13"], {}, 2, ["--encoding", "not a text encoding"]),
    (["train", "C", "--encoding", "base64"], {}, 2, ["--encoding", "not a text encoding"]),
    (["score", "M", "F", "--encoding", "zlib"], {}, 2, ["--encoding", "not a text encoding"]),
    (["score", "M", "F", "--encoding", "klingon"], {}, 2, ["--encoding", "unknown encoding"]),
    (["train", "C", "--config", "T"], {"T": UTF8_BAD}, 2, ["--config", "not valid UTF-8", "byte 16"]),
    (["train", "C", "--config", "T"], {"T": b"lr = nan\n"}, 2, ["--lr", "finite"]),
    (["train", "C", "--config", "T"], {"T": b"eval-every = 0\n"}, 2, ["--eval-every"]),
    (["train", "C", "--config", "T"], {"T": b"[train]\nseed = -1\n"}, 2, ["--seed"]),
    (["train", "C", "--config", "T"], {"T": b"hidden = \"big\"\n"}, 2, ["hidden must be an integer", "string"]),
    (["train", "C", "--config", "T"], {"T": b"hidden = [16]\n"}, 2, ["hidden must be an integer", "array"]),
    (["train", "C", "--config", "T"], {"T": b"out = 5\n"}, 2, ["out must be a string"]),
    (["train", "C", "--config", "T"], {"T": b"cell = \"transformer\"\n"}, 2, ["--cell"]),
    # 8. silent coercion
    (["train", "C", "--config", "T"], {"T": b"hidden = 16.5\n"}, 2, ["hidden must be an integer", "float"]),
    (["train", "C", "--config", "T"], {"T": b"layers = true\n"}, 2, ["layers must be an integer", "boolean"]),
    (["train", "C", "--config", "T"], {"T": b"tie = 1\n"}, 2, ["tie must be true or false"]),
    (["train", "C", "--classes", "-5"], {}, 2, ["--classes"]),
    # dynamic evaluation (score --document --dynamic)
    (["score", "M", "F", "--dynamic"], {}, 2, ["--dynamic", "needs --document"]),
    (["score", "M", "F", "--document", "--dynamic-lr", "0.01"], {}, 2, ["--dynamic-lr", "--dynamic only"]),
    (["score", "M", "F", "--dynamic-tune", "F"], {}, 2, ["--dynamic-tune", "--dynamic only"]),
    (["score", "M", "F", "--document", "--dynamic", "--streams", "2"], {}, 2, ["--streams", "one stream"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-tune", "C", "--dynamic-lr", "0.1", "--dynamic-decay", "0"],
     {}, 2, ["--dynamic-tune", "nothing to choose"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-lr", "nan"], {}, 2, ["--dynamic-lr", "finite"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-lr", "inf"], {}, 2, ["--dynamic-lr", "finite"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-lr", "-0.1"], {}, 2, ["--dynamic-lr"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-decay", "1.5"], {}, 2, ["--dynamic-decay"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-decay", "nan"], {}, 2, ["--dynamic-decay", "finite"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-segment", "0"], {}, 2, ["--dynamic-segment"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-segment", "-3"], {}, 2, ["--dynamic-segment"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-stats", "P"], {"P": FIFO}, 1, ["P", "FIFO"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-tune", "P"], {"P": FIFO}, 1, ["P", "FIFO"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-stats", "nope.txt"], {}, 1, ["nope.txt", "no such file"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-stats", "E"], {"E": b""}, 1, ["E", "no token"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-tune", "E"], {"E": b""}, 1, ["E", "no token"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-stats", "B"], {"B": b"PK\x03\x04\x00\x00"}, 1,
     ["B", "binary"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-tune", "S"], {"S": b"the cat\n"}, 1,
     ["S", "is the text being scored", "--dynamic-tune"]),
    (["score", "M", "F", "--document", "--dynamic", "--dynamic-stats", "S"], {"S": b"the cat\n"}, 1,
     ["S", "is the text being scored", "--dynamic-stats"]),
]


@pytest.mark.parametrize("args, files, code, needles", CATALOGUE,
                         ids=[" ".join(a) for a, *_ in CATALOGUE])
def test_catalogue(tmp_path, model, args, files, code, needles):
    corpus = write_corpus(tmp_path)
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat\n")
    paths = {"C": corpus, "M": model, "F": lines}
    for key, content in files.items():
        paths[key] = tmp_path / f"{key.lower()}.in"
        if content == FIFO:
            os.mkfifo(paths[key])
        else:
            paths[key].write_bytes(content)
    argv = [paths.get(a, a) for a in args]
    if args[0] == "train":
        argv += ["--out", tmp_path / "out", *TINY, "--max-steps", 2]
    elif args[0] in ("sample", "score", "gradcheck"):
        argv += ["--device", "cpu"]
    with time_limit(30):  # a FIFO opened by mistake would wait forever
        result = invoke(*argv)
    needles = [str(paths[n]) if n in files else n for n in needles]
    one_message(result, code, *needles)
    assert not (tmp_path / "out").exists()


def test_config_values_of_the_right_kind_still_work(tmp_path):
    """Integers where a float is wanted are numbers; the run uses the config's values."""
    corpus = write_corpus(tmp_path)
    cfg = tmp_path / "ok.toml"
    # (input_scale = 0: the weaker initial input keeps Adam at lr 1 without a clip from diverging in 2 steps)
    cfg.write_text("[train]\nhidden = 12\nlr = 1\nclip = 0\ninput_scale = 0\ntie = false\nout = \"%s\"\n" % (tmp_path / "run"))
    check_ok(invoke("train", corpus, "--config", cfg, "--layers", "1", "--seq-len", "8", "--batch-size", "4",
                    "--device", "cpu", "-q", "--max-steps", "2"))
    ckpt = checkpoint.load(tmp_path / "run" / "model.npz")
    assert ckpt.config.hidden == 12 and ckpt.meta["train"]["lr"] == 1.0 and ckpt.meta["train"]["input_scale"] == 0.0


def test_escapes_are_decoded_one_by_one():
    """Python's escapes mean what they do in Python; other characters (and unknown escapes)
    stay as typed: "é" was mangled into "Ã©" by decoding all the text as unicode_escape."""
    from charnn.cli.options import unescape

    assert unescape(None, None, "é\\n") == "é\n"
    assert unescape(None, None, "a\\tb\\\\c\\x41\\u00e9\\N{BULLET}\\d") == "a\tb\\cAé•\\d"
    assert unescape(None, None, "plain") == "plain"


def test_library_refuses_fifo_and_non_text_codecs(tmp_path):
    from charnn.io.data import CorpusError, read_text

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with time_limit(20):
        with pytest.raises(CorpusError, match="FIFO"):
            read_text(fifo)
        # As a stream (score's FILE), a FIFO without a writer is found empty instead of waited on.
        with pytest.raises(CorpusError, match="nothing to read"):
            read_text(fifo, pipes=True)
    text = write_corpus(tmp_path)
    for codec in ("rot13", "hex"):
        with pytest.raises(CorpusError, match="not a text encoding"):
            read_text(text, codec)


# ----- metrics.jsonl on resume -----

@pytest.mark.parametrize("content, needle", [
    (b'{"step": 1}\n\xff\xfe\n', "not valid UTF-8"),
    (b'{"step": 1}\n[1, 2]\n', "line 2 is not a JSON object"),
    (b'{"step": "one"}\n', "line 1"),
])
def test_resume_with_a_damaged_metrics_file(tmp_path, content, needle):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 2))
    (out / "metrics.jsonl").write_bytes(content)
    one_message(invoke("train", "--resume", "--out", out, "--max-steps", 4, "-q", "--device", "cpu"), 1,
                str(out / "metrics.jsonl"), needle)
    assert (out / "metrics.jsonl").read_bytes() == content  # nothing was trimmed away


# ----- odd outputs -----

def test_score_jsonl_is_json_even_for_a_model_with_huge_weights(tmp_path, model):
    """Every line parses as strict JSON (non-finite numbers would be written as null: json.dumps
    writes Infinity, which is not JSON)."""
    def edit(arrays, meta):
        for k in arrays:
            if k.startswith("param/"):
                arrays[k] = arrays[k] * numpy.float32(1e30)
    huge = rewrite(model, tmp_path / "huge.npz", edit)
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat sat\na dog ran\n")

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")
    for extra in ([], ["--document"]):
        r = check_ok(invoke("score", huge, lines, "--format", "jsonl", "--tokens", "--device", "cpu", *extra))
        objs = [json.loads(line, parse_constant=no_constants) for line in r.stdout.splitlines()]
        assert objs[-1]["summary"]


def test_json_lines_write_null_for_numbers_json_lacks():
    from charnn.cli.common import json_line

    line = json_line({"logprob": float("-inf"), "bits": [["a", float("nan")], ["b", 1.5]], "n": 3})
    assert line == '{"logprob": null, "bits": [["a", null], ["b", 1.5]], "n": 3}\n'


# ----- real processes: pipes, FIFOs, Ctrl-C -----

def charnn_main(*args, **kw):
    """charnn as the installed command runs it (charnn/__main__.py, whose guard covers the imports)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "charnn", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def finish(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"charnn still running after {timeout} s")
    return proc.returncode, out.decode(), err.decode()


def test_fifo_model_and_corpus_do_not_hang(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (["train", fifo, "--out", tmp_path / "out"], ["sample", fifo], ["score", fifo, fifo]):
        code, out, err = finish(charnn_main(*args, "--device", "cpu"), timeout=60)
        assert code == 1 and "FIFO" in err and "Traceback" not in err, (args, code, err)
        assert len(err.strip().splitlines()) == 1


def test_a_fifo_model_is_refused_by_every_command(tmp_path):
    """`train --init-from f.safetensors`, f a named pipe, waited forever (info and sample refused
    it): every command that reads a model, and a run folder whose model.npz is a FIFO, refuse
    it without opening it (in a child process, so a regression hangs the child, not the suite)."""
    fifo = tmp_path / "f.safetensors"
    os.mkfifo(fifo)
    folder = tmp_path / "run"
    folder.mkdir()
    os.mkfifo(folder / "model.npz")
    commands = every_model_command(fifo, tmp_path) + [["sample", folder, "-n", 3, "--device", "cpu"],
                                                      ["info", folder], ["export", folder, tmp_path / "y.safetensors"]]
    for (code, err, crash), args in zip(capped(*commands, timeout=90), commands):
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert crash is None and code == 1 and len(errors) == 1, (args, code, err, crash)
        assert "is a FIFO (named pipe), not a regular model file" in errors[0], (args, errors)
        assert ("model.npz" if folder in args else str(fifo)) in errors[0]


def test_score_reads_a_pipe_given_as_its_only_argument(tmp_path, model):
    """`charnn score <(cat lines.txt)`: deciding whether /dev/fd/N is a model must not read it."""
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat\na dog\nthe end\n")
    env = dict(os.environ, CHARNN_DEFAULT_MODEL=str(model))
    for script in ('"$0" -m charnn score <(cat "$1") --format jsonl --device cpu',
                   'cat "$1" | "$0" -m charnn score /dev/stdin --format jsonl --device cpu',
                   'cat "$1" | "$0" -m charnn score - --format jsonl --device cpu'):
        proc = subprocess.run(["bash", "-c", script, sys.executable, str(lines)], capture_output=True,
                              timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr.decode()
        summary = json.loads(proc.stdout.decode().splitlines()[-1])
        assert summary["lines"] == 3, (script, summary)


@pytest.mark.parametrize("command", [
    ["score", "M", "F", "--format", "jsonl"],
    ["score", "M", "F"],
    ["score", "M", "F", "--tokens"],
    ["gradcheck", "--cell", "rnn", "--layers", "1", "--embed", "0", "--level", "char"],
    ["sample", "M", "-n", "3000"],
    ["--help"],
])
def test_broken_pipe_exits_0_quietly(tmp_path, model, command):
    """`charnn ... | head -n 1`: every command ends quietly with status 0, as sample did."""
    lines = tmp_path / "lines.txt"
    lines.write_text(corpus_text(2000))
    args = [{"M": model, "F": lines}.get(a, a) for a in command] + (["--device", "cpu"] if command[0] != "--help" else [])
    proc = charnn_main(*args)
    proc.stdout.close()  # the reader went away before the first write
    code, _, err = finish(proc)
    assert code == 0 and err == "", (code, err)


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.6, 1.0, 2.0])
def test_ctrl_c_at_any_moment_is_one_line_and_130(tmp_path, delay):
    """Ctrl-C during the imports, the setup or training: no traceback and no "Aborted!", status 130
    (or death by SIGINT, which shells also show as 130, when it comes before Python's handler)."""
    corpus = write_corpus(tmp_path, lines=2000)
    proc = charnn_main("train", corpus, "--out", tmp_path / "out", *TINY, "--max-steps", 10**6)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc, timeout=120)
    if code == 1 and "init_import_site" in err:
        # On a loaded machine 0.1 s can fall inside the interpreter's own startup (importing
        # site), before any of charnn's code runs; CPython then reports a fatal error itself.
        pytest.skip("SIGINT arrived while Python itself was starting (the machine is loaded)")
    if code == -signal.SIGINT and "_get_module_details" in err:
        # Or inside runpy's import of the package for `python -m charnn`, before charnn/__main__.py
        # runs (1 of 200 starts interrupted at 0.1 s on 2026-12-06): Python's own traceback.
        pytest.skip("SIGINT arrived while runpy was importing charnn, before its code ran")
    assert code in (130, -signal.SIGINT), (code, err)
    assert "Traceback" not in err and "Aborted" not in err, err
    assert len(err.strip().splitlines()) <= 1, err


def test_ctrl_c_while_the_command_line_is_parsed_is_130(monkeypatch):
    """Ctrl-C can land while click parses the arguments (a few milliseconds): the same one
    line and status 130 as later, not click's "Aborted!" and 1."""
    import click
    from click.testing import CliRunner

    from charnn.cli import Group, cli

    def interrupt(self, ctx, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(click.Group, "parse_args", interrupt)
    result = CliRunner().invoke(cli, ["sample", "--length", "1"])
    assert result.exit_code == 130, (result.exit_code, result.output)
    assert "Aborted" not in result.output and "interrupted" in result.stderr
    assert Group.parse_args is not click.Group.parse_args


def test_ctrl_c_before_click_starts_is_130(monkeypatch, capsys):
    """Ctrl-C while the group's main looks for an MPI launcher (its import pulls NumPy in): one
    line and status 130, not a traceback (a CI run under load caught one there)."""
    import charnn.dist
    from charnn.cli import cli

    def interrupt(env=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(charnn.dist, "env_size", interrupt)
    with pytest.raises(SystemExit) as e:
        try:
            cli.main(["sample", "--length", "1"], prog_name="charnn")
        except KeyboardInterrupt:
            pytest.fail("the KeyboardInterrupt escaped (a traceback)")
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["Error: interrupted"]


SWALLOW = """
import os, signal, sys, weakref
{install}
class Thing:
    pass

def callback(ref):  # a Ctrl-C lands while a weakref callback runs, as in importlib's module locks
    os.kill(os.getpid(), signal.SIGINT)
    sum(range(1000))  # (Python runs the handler here, inside the callback)

thing = Thing()
ref = weakref.ref(thing, callback)
try:
    del thing
    sum(range(10 ** 6))
    print("carried on")
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.parametrize("installed", [True, False])
def test_a_ctrl_c_a_weakref_callback_swallows_is_raised_again(installed):
    """Python reports a KeyboardInterrupt raised inside a weakref callback as "Exception ignored"
    and carries on (the control: without charnn.interrupt the script carries on); the command
    line's hook raises it again in the code that runs next, without that report."""
    code = SWALLOW.format(install="import charnn.interrupt; charnn.interrupt.install()" if installed else "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if installed:
        assert r.stdout.strip() == "interrupted" and r.stderr == "", (r.stdout, r.stderr)
    else:
        assert r.stdout.strip() == "carried on" and "Exception ignored" in r.stderr, (r.stdout, r.stderr)


def test_a_ctrl_c_printed_by_code_that_carries_on_shows_no_traceback():
    """C code that catches an exception and prints it (PyErr_Print, through sys.excepthook)
    before carrying on printed a KeyboardInterrupt's traceback above "Error: interrupted" once
    in 200 interrupted starts; the command line's hook prints nothing for one, and the rest as
    Python does."""
    code = ("import sys, charnn.interrupt as interrupt\n"
            "interrupt.install()\n"
            "sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)\n"
            "sys.excepthook(ValueError, ValueError('shown'), None)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "KeyboardInterrupt" not in r.stderr and "ValueError: shown" in r.stderr, r.stderr


@pytest.mark.parametrize("seen", [True, False])
def test_an_error_a_ctrl_c_turned_into_is_the_interruption(seen):
    """Python 3.11 turns a KeyboardInterrupt raised while a class is made into "RuntimeError:
    Error calling __set_name__" (numba's imports make many classes): after a Ctrl-C reached the
    command line's handler, such an error is one line and 130; without one, it is not hidden."""
    code = ("import charnn.__main__ as main, charnn.cli, charnn.interrupt as interrupt\n"
            "def command(**kw):\n"
            f"    interrupt._seen = {seen}\n"
            "    raise RuntimeError('Error calling __set_name__')\n"
            "charnn.cli.cli = command\n"
            "main.main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if seen:
        assert (r.returncode, r.stderr) == (130, "Error: interrupted\n"), (r.returncode, r.stderr)
    else:
        assert r.returncode == 1 and "RuntimeError: Error calling __set_name__" in r.stderr


def test_a_ctrl_c_swallowed_before_training_stops_it_before_its_first_step(tmp_path, monkeypatch):
    """A Ctrl-C seen by the command line's handler but swallowed before training put in its own
    (charnn.interrupt.check where ctrl_c_stops starts): one line, status 130, no step taken."""
    import charnn.interrupt

    monkeypatch.setattr(charnn.interrupt, "_seen", True)
    corpus = write_corpus(tmp_path)
    r = invoke("train", corpus, "--out", tmp_path / "out", *TINY, "--max-steps", 5)
    assert r.exit_code == 130, (r.exit_code, r.output)
    assert r.stderr.strip().splitlines()[-1] == "Error: interrupted"
    assert "Traceback" not in r.output and not (tmp_path / "out" / "model.npz").exists()


@pytest.mark.parametrize("command", [["sample", "--length", "3"], ["score", "-"], ["gradcheck", "--cell", "rnn",
                                     "--layers", "1", "--embed", "0", "--level", "char"], ["train", "C"]])
@pytest.mark.parametrize("value", ["two", "0"])
def test_a_bad_charnn_threads_is_one_line(tmp_path, model, command, value):
    """The CHARNN_* variables are read once, when the first backend is made: a value charnn
    cannot use is one line and exit 1 from every command that computes (a real process, since
    the settings of this one are already read), and no run folder is made."""
    corpus = write_corpus(tmp_path)
    argv = [str(corpus) if a == "C" else a for a in command]
    if command[0] == "train":
        argv += ["--out", str(tmp_path / "out"), *map(str, TINY), "--max-steps", "2"]
    env = dict(os.environ, CHARNN_THREADS=value, CHARNN_DEFAULT_MODEL=str(model))
    proc = subprocess.run([sys.executable, "-m", "charnn", *argv], input="the cat\n", capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: CHARNN_THREADS must be a positive integer, not '{value}'"], proc.stderr
    assert not (tmp_path / "out").exists()


# ----- options that would exhaust the machine (issue 34): refused before allocating -----

MEMORY_CAP = 3 * 2**30  # RLIMIT_AS of the children below: a regression fails, it cannot swap the machine


# Runs charnn under the cap and reports its exit status and its own peak resident memory
# (ru_maxrss from wait4). Through this small process, not from pytest's: Linux carries a
# process's ru_maxrss across exec from the process it was forked from, so a child of a large
# pytest process would report pytest's size.
CAPPED_WRAPPER = r"""
import json, os, resource, subprocess, sys
cap, report = int(sys.argv[1]), sys.argv[2]
proc = subprocess.Popen(sys.argv[3:], preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
_, status, usage = os.wait4(proc.pid, 0)
with open(report, "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024], f)
"""


def run_capped(*args, cap=MEMORY_CAP, timeout=120, **kw):
    """charnn as a real process under an address-space limit of ``cap`` bytes: (exit status,
    stdout, stderr, its peak resident memory in bytes)."""
    import tempfile

    env = dict(os.environ, PYTHONUNBUFFERED="1", **kw.pop("env", {}))
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        proc = subprocess.Popen([sys.executable, "-c", CAPPED_WRAPPER, str(cap), report, sys.executable, "-m", "charnn",
                                 *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                start_new_session=True, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the wrapper and charnn under it
            proc.communicate()
            raise AssertionError(f"charnn still running after {timeout} s: {args}")
        with open(report) as f:
            code, peak = json.load(f)
    return code, out.decode(), err.decode(), peak


def one_error_line(code, out, err, expected_code, *needles):
    assert code == expected_code, (code, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("args, needle", [
    (["train", "C", "--layers", "10000000"], "--layers 10000000: the model needs about"),
    (["train", "C", "--hidden", "30000"], "--hidden 30000: the model needs about"),
    (["train", "C", "--embed", "100000000"], "--embed 100000000: the model needs about"),
    (["train", "C", "--batch-size", "1000000000"], "--batch-size 1000000000: the model needs about"),
    (["train", "C", "--seq-len", "1000000000"], "--seq-len 1000000000: the model needs about"),
    (["gradcheck", "--seq-len", "1000000000"], "--seq-len 1000000000: the gradient check needs about"),
    (["gradcheck", "--batch-size", "1000000000"], "--batch-size 1000000000: the gradient check needs about"),
    (["gradcheck", "--hidden", "30000", "--layers", "1"], "--hidden 30000: the gradient check needs about"),
    (["gradcheck", "M", "--seq-len", "1000000000"], "--seq-len 1000000000: the gradient check needs about"),
    (["sample", "M", "--beam-size", "1000000000"], "--beam-size 1000000000: beam search needs about"),
])
def test_options_that_would_exhaust_the_machine_are_refused_before_allocating(tmp_path, model, args, needle):
    """Each once hung or ended in an ArrayMemoryError or ValueError traceback (gradcheck --seq-len
    1000000000 took 23 GB first); now one line naming the option, its estimate and the memory
    available (here the room under the test's 3 GB cap), at a few hundred MB."""
    corpus = write_corpus(tmp_path)
    argv = [{"C": corpus, "M": model}.get(a, a) for a in args]
    if args[0] == "train":
        argv += ["--out", tmp_path / "out", "--max-steps", 2, "-q"]
    code, out, err, peak = run_capped(*argv, "--device", "cpu")
    msg = one_error_line(code, out, err, 1, needle, "available", "--max-memory")
    assert out == ""
    assert peak < 600 * 2**20, (peak / 2**20, msg)
    assert not (tmp_path / "out").exists()


def test_a_normal_run_is_never_refused_under_the_cap(tmp_path):
    """The defaults' estimate is far below any machine's memory: a run with them trains under
    the 3 GB cap (whose room is what the check sees there)."""
    corpus = write_corpus(tmp_path, lines=400)
    code, out, err, peak = run_capped("train", corpus, "--out", tmp_path / "run", "--max-steps", 3, "--device", "cpu", "-q",
                                  "--sample-length", 0)
    assert code == 0, err
    assert (tmp_path / "run" / "model.npz").exists()


@pytest.fixture
def small_resident(monkeypatch):
    """In-process commands count this process's resident memory towards --max-memory: pytest's
    own varies, so it is fixed at 100 MB here."""
    from charnn import memory

    monkeypatch.setattr(memory, "resident", lambda: 100 * 10**6)


def test_scoring_a_batch_too_large_names_the_batch_or_the_line(tmp_path, model, small_resident):
    many = tmp_path / "many.txt"
    many.write_text(("the cat " * 25_000 + "\n") * 30)  # 30 lines of 200,000 characters
    # A 200,000-token line alone fits in 1 GB; 30 of them in one batch do not.
    one_message(invoke("score", model, many, "--device", "cpu", "--max-memory", "1G"), 1,
                "--batch-size 64: scoring needs about", "more than --max-memory 1.0 GB")
    check_ok(invoke("score", model, many, "--device", "cpu", "--max-memory", "1G", "--batch-size", "2",
                    "--format", "jsonl", "-q"))
    long = tmp_path / "long.txt"
    long.write_text("the cat\n" + "the cat " * 500_000 + "\n")
    one_message(invoke("score", model, long, "--device", "cpu", "--max-memory", "1G"), 1,
                "line 2 (4,000,000 tokens; --document scores a text of any length in pieces)")
    check_ok(invoke("score", model, long, "--document", "--device", "cpu", "--max-memory", "1G", "-q"))


def test_scoring_too_many_streams_or_too_long_a_segment_is_refused(tmp_path, model, small_resident):
    text = tmp_path / "text.txt"
    text.write_text(corpus_text(40_000))  # about a million characters
    one_message(invoke("score", model, text, "--document", "--streams", "1000000", "--device", "cpu",
                       "--max-memory", "400M"), 1, "--streams 1000000: scoring needs about", "--max-memory 400 MB")
    (tmp_path / "stats.txt").write_text(corpus_text(100, seed=3))
    one_message(invoke("score", model, text, "--document", "--dynamic", "--dynamic-segment", "1000000",
                       "--dynamic-stats", tmp_path / "stats.txt", "--device", "cpu", "--max-memory", "400M"), 1,
                "--dynamic-segment 1000000: dynamic evaluation needs about")


def test_a_prime_or_beam_too_large_is_refused_by_the_library_too(model, small_resident):
    from charnn import memory
    from charnn.io.checkpoint import load_model
    from charnn.sample import beam_search, generate

    lm, vocab, _ = load_model(model)
    with pytest.raises(memory.MemoryLimitError, match=r"^--prime \(2,000,000 tokens\): warming the state on it"):
        next(generate(lm, vocab, 5, prime="the cat " * 250_000, max_memory=300 * 10**6))
    with pytest.raises(memory.MemoryLimitError, match=r"^--beam-size 100000: beam search needs about"):
        beam_search(lm, vocab, 50, 100_000, max_memory=300 * 10**6)
    assert len(next(generate(lm, vocab, 5, prime="the cat ", max_memory=300 * 10**6))) == 1


def test_a_toml_config_nested_too_deep_is_one_line(tmp_path):
    corpus = write_corpus(tmp_path)
    for text in ("hidden = " + "[" * 100_000 + "]" * 100_000, "a = " + "{x = " * 100_000 + "1" + "}" * 100_000):
        config = tmp_path / "deep.toml"
        config.write_text(text + "\n")
        one_message(train(corpus, tmp_path / "out", "--config", config), 2, "--config", str(config),
                    "nested too deeply")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, needle", [
    (b'{"step": 1}\n' + b"[" * 5000 + b"]" * 5000 + b"\n", "line 2 is not a JSON object"),
    (b'{"step": 1}\n' + b'{"step": ' + b"9" * 5000 + b"}\n", "line 2 is not a JSON object"),
    (b'{"step": 1}\n' + b"x" * 70_000 + b"\n", "line 2 is longer than 65,536 bytes"),
])
def test_resume_with_a_metrics_line_too_deep_or_too_long(tmp_path, content, needle):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 2))
    (out / "metrics.jsonl").write_bytes(content)
    one_message(invoke("train", "--resume", "--out", out, "--max-steps", 4, "-q", "--device", "cpu"), 1,
                str(out / "metrics.jsonl"), needle, "to resume")
    assert (out / "metrics.jsonl").read_bytes() == content


# ----- plot's inputs (issue 34) -----

def plot_run(folder, tail: bytes):
    """A run folder whose metrics.jsonl holds two good lines and then ``tail``."""
    folder.mkdir()
    good = [{"type": "train", "step": 5, "tokens": 50, "elapsed": 1.0, "train_loss": 2.5},
            {"type": "eval", "step": 5, "tokens": 50, "elapsed": 1.5, "val_loss": 2.6}]
    (folder / "metrics.jsonl").write_bytes("".join(json.dumps(m) + "\n" for m in good).encode() + tail)
    return folder


@pytest.mark.parametrize("tail, needles", [
    (b'{"type": "train", "step": ' + b"9" * 4000 + b', "train_loss": 2.0}\n',
     ["line 3", "step is an integer of 4,000 digits", "from 0 to 10^15"]),
    (b'{"type": "train", "step": 6, "train_loss": 1e308}\n', ["line 3", "train_loss is 1e+308"]),
    (b'{"type": "eval", "step": 6, "val_loss": -1e308}\n', ["line 3", "val_loss is -1e+308"]),
    (b'{"type": "train", "step": 6, "train_loss": 2.0, "elapsed": 1e300}\n', ["line 3", "elapsed is 1e+300"]),
    (b'{"type": "train", "step": -6, "train_loss": 2.0}\n', ["line 3", "step is -6"]),
    (b'{"type": "train", "step": 6.5, "train_loss": 2.0}\n', ["line 3", "step is 6.5"]),
    (b'{"type": "train", "step": 6, "train_loss": 2.0, "tokens": true}\n', ["line 3", "tokens is true"]),
    (b'{"type": "train", "step": 6, "train_loss": "\xff"}\n', ["not valid UTF-8 at byte", "(line 3)"]),
    (b"[" * 70_000 + b"\n", ["line 3 is longer than 65,536 bytes"]),
])
def test_plot_refuses_metrics_it_cannot_draw(tmp_path, tail, needles):
    run = plot_run(tmp_path / "run", tail)
    one_message(invoke("plot", run, "-o", tmp_path / "p.png"), 1, str(run / "metrics.jsonl"), *needles)
    assert not (tmp_path / "p.png").exists()


def test_plot_skips_a_line_nested_too_deep_as_a_torn_one(tmp_path):
    run = plot_run(tmp_path / "run", b'{"step": 7, "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}\n" + b"[" * 30_000 + b"\n")
    r = check_ok(invoke("plot", run, "-o", tmp_path / "p.png"))
    assert "run: 5 steps" in r.output


def test_a_huge_metrics_line_costs_no_memory(tmp_path):
    """A 60 MB line of nested lists (180 MB cost 4.6 GB) is refused after its first 64 KiB."""
    run = plot_run(tmp_path / "run", b"[" + b"[1, 2, 3], " * 6_000_000 + b"[]]\n")
    code, out, err, peak = run_capped("plot", run, "-o", tmp_path / "p.png")
    one_error_line(code, out, err, 1, "line 3 is longer than 65,536 bytes")
    assert peak < 300 * 2**20, peak / 2**20


def test_plot_titles_matplotlib_cannot_read_or_that_are_not_text(tmp_path):
    pytest.importorskip("matplotlib")
    run = plot_run(tmp_path / "run$x$", b"")
    r = check_ok(invoke("plot", run, "-o", tmp_path / "p.svg", "--title", "$\\frac{$"))
    assert "the title is not mathtext matplotlib can read; drawn as typed" in r.stderr
    svg = (tmp_path / "p.svg").read_text()
    assert "$\\frac{$" in svg and "run$x$ train" in svg  # both as typed
    r = check_ok(invoke("plot", run, "-o", tmp_path / "q.svg", "--title", "loss $\\alpha$"))
    assert r.stderr == ""
    one_message(invoke("plot", run, "-o", tmp_path / "r.png", "--title", "caf\udcff"), 2, "--title", "not valid text")
    assert not (tmp_path / "r.png").exists()


def test_plot_names_that_are_not_utf8_are_shown(tmp_path):
    """A run folder and an output whose names hold bytes that are not UTF-8 (a real process: the
    names come through the command line as bytes)."""
    pytest.importorskip("matplotlib")
    run = plot_run(tmp_path / "r\udcffun", b"")
    out = tmp_path / "o\udcffut.svg"
    proc = subprocess.run([sys.executable, "-m", "charnn", "plot", str(run), "-o", str(out)], capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"r\ufffdun: 5 steps, best validation loss 2.6000 at step 5\nwrote {tmp_path}/o\ufffdut.svg\n"
    assert out.exists()
