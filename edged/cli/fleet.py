"""`edged keys`, `edged bundle sign|pack` and `edged fleet serve|publish|status`."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from edged.cli.common import fail

from edged.errors import EdgedError

keys_app = typer.Typer(help="Ed25519 signing keys for OTA bundles.", no_args_is_help=True)
fleet_app = typer.Typer(
    help="Fleet OTA updates: serve bundles, publish an update to a group or devices, watch the rollout.\n\n"
    "Typical flow: `edged keys generate`, `edged bundle sign`, `edged bundle pack`, `edged fleet serve DIR`, "
    "`edged fleet publish BUNDLE.tar.gz --group line1 --url http://HOST:8000/`, `edged fleet status --group line1 --watch`.",
    no_args_is_help=True,
)
BROKER_OPTION = typer.Option("127.0.0.1:1883", "--broker", envvar="EDGED_BROKER", help="MQTT broker HOST:PORT.")
PREFIX_OPTION = typer.Option("edged", "--topic-prefix", help="Topic prefix (mqtt.topic_prefix of the devices).")
CONFIG_OPTION = typer.Option(None, "--config", "-c", help="Take broker, credentials and prefix from this edged.toml's mqtt section.")


_fail = fail


def _broker(address: str, prefix: str, config: Optional[Path]):
    from edged.fleet import Broker

    if config is None:
        return Broker.parse(address, prefix)
    from edged.config import load_config

    mqtt = load_config(config).mqtt
    return Broker(host=mqtt.host, port=mqtt.port, username=mqtt.username, password=mqtt.password,
                  tls=mqtt.tls, ca_file=mqtt.ca_file, cert_file=mqtt.cert_file, key_file=mqtt.key_file,
                  prefix=mqtt.topic_prefix.rstrip("/"))


# -- keys and signing ------------------------------------------------------------------
def keys_generate(
    out_dir: Path = typer.Option(Path("keys"), "--out-dir", help="Where to write NAME.key (private) and NAME.pub."),
    name: str = typer.Option("edged", "--name", help="File name stem of the key pair."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing key pair."),
) -> None:
    """Create an Ed25519 key pair for signing bundles.

    Keep NAME.key secret (mode 0600, on the build machine only). Copy NAME.pub into
    /etc/edged/trusted-keys/ on every device that should accept bundles signed with it.
    """
    from edged.signing import generate_keypair

    try:
        key_id = generate_keypair(out_dir / f"{name}.key", out_dir / f"{name}.pub", overwrite=force)
    except EdgedError as exc:
        _fail(str(exc))
    typer.echo(f"key id {key_id}\nprivate key: {out_dir / (name + '.key')} (keep it secret)\n"
               f"public key:  {out_dir / (name + '.pub')} -> copy to /etc/edged/trusted-keys/ on devices")


def bundle_sign(
    path: Path = typer.Argument(..., help="Bundle directory or .tar.gz (an archive is rewritten in place)."),
    key: Path = typer.Option(..., "--key", "-k", help="Ed25519 private key (PEM) from `edged keys generate`."),
) -> None:
    """Sign a bundle: writes manifest.sig, a signature over manifest.json (which lists
    every file's sha256). A bundle whose files no longer match its manifest is refused.

    Examples: `edged bundle sign bundles/digits-onnx --key keys/edged.key`, or for an
    archive (unpacked safely, signed, repacked atomically in place):
    `edged bundle sign site/digits-2.0.0.tar.gz --key keys/edged.key`."""
    from edged.bundle import _bundle_root, is_archive, open_bundle, pack_bundle, safe_extract
    from edged.signing import load_private_key, sign_bundle_dir

    staged = path.with_name(f".{path.name}.tmp")
    try:
        private = load_private_key(key)
        if is_archive(path):
            with tempfile.TemporaryDirectory(prefix="edged-sign-") as tmp:
                safe_extract(path, Path(tmp) / "b")
                root = _bundle_root(Path(tmp) / "b")
                open_bundle(root)
                signature = sign_bundle_dir(root, private)
                pack_bundle(root, staged)
                staged.replace(path)
        else:
            open_bundle(path)  # refuse to sign a bundle whose files do not match its manifest
            signature = sign_bundle_dir(path, private)
    except (EdgedError, OSError) as exc:
        if staged.is_file():
            staged.unlink()
        _fail(str(exc))
    typer.echo(f"signed {path} with key {signature.key_id}")


def bundle_pack(
    path: Path = typer.Argument(..., help="Bundle directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Archive to write (default: NAME-VERSION.tar.gz here)."),
) -> None:
    """Pack a (signed) bundle directory as .tar.gz for `edged fleet publish`; the
    files are checked against the manifest first and the archive appears atomically.

    Example: `edged bundle pack bundles/digits-onnx -o site/digits-2.0.0.tar.gz`."""
    from edged.bundle import open_bundle, pack_bundle
    from edged.signing import SIGNATURE_FILE

    try:
        bundle = open_bundle(path)
    except EdgedError as exc:
        _fail(str(exc))
    target = out or Path(f"{bundle.manifest.name}-{bundle.manifest.version}.tar.gz")
    staged = target.with_name(f".{target.name}.tmp")
    try:
        pack_bundle(path, staged)
        staged.replace(target)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        _fail(f"cannot write {target}: {exc}")
    typer.echo(f"wrote {target} ({target.stat().st_size} bytes)")
    if not (Path(path) / SIGNATURE_FILE).is_file():
        typer.secho("note: the bundle is unsigned; devices refuse it (run `edged bundle sign` on the directory "
                    "or the archive)", fg=typer.colors.YELLOW, err=True)


# -- fleet ---------------------------------------------------------------------------
def fleet_serve(
    directory: Path = typer.Argument(..., help="Directory of bundle archives to serve."),
    host: str = typer.Option("127.0.0.1", "--host", help="Listen address (0.0.0.0 for the whole network)."),
    port: int = typer.Option(8000, "--port", help="Listen port."),
) -> None:
    """Serve bundle archives over HTTP with Range support (downloads resume).

    For tests and small sites; any HTTP server (nginx, S3, ...) works as well. Only
    files under DIR are served (no listings); every request is logged with its Range.

    Example: `edged fleet serve site/ --host 0.0.0.0 --port 8000`."""
    import logging

    from edged.fleet import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        server = serve(directory, host, port)
    except (EdgedError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"serving {directory} on http://{host}:{server.server_address[1]}/", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def fleet_publish(
    archive: Path = typer.Argument(..., help="Signed bundle .tar.gz (`edged bundle sign` + `edged bundle pack`)."),
    url: Optional[str] = typer.Option(None, "--url", help="Where devices download it (needed unless --clear); a URL ending in / gets the file name appended."),
    group: Optional[str] = typer.Option(None, "--group", "-g", help="Fleet group: publish to edged/fleet/GROUP/ota/MODEL."),
    devices: Optional[str] = typer.Option(None, "--devices", help="Comma-separated device ids: with --group, only these; alone, one topic per device."),
    canary: float = typer.Option(100.0, "--canary", help="Percent of the targeted devices that update (a stable slice per release)."),
    allow_downgrade: bool = typer.Option(False, "--allow-downgrade", help="Let devices go to a lower version than they run."),
    key: Optional[Path] = typer.Option(None, "--key", "-k", envvar="EDGED_FLEET_KEY", help="Fleet private key (from `edged keys generate`) that signs the update intent; devices trust its .pub in ota.trusted_keys_dir."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Publish an unsigned bundle or an unsigned intent (devices refuse both unless ota.allow_unsigned, a development setting)."),
    clear: bool = typer.Option(False, "--clear", help="Remove the retained update message instead (devices keep what they run)."),
    broker: str = BROKER_OPTION,
    topic_prefix: str = PREFIX_OPTION,
    config: Optional[Path] = CONFIG_OPTION,
) -> None:
    """Publish a retained OTA update message (QoS 1, acknowledged by the broker) for
    a group (topic PREFIX/fleet/GROUP/ota/MODEL) or for single devices (topic
    PREFIX/DEVICE/ota/update/MODEL). Model, version, signature, sha256 and size come
    from the archive; the whole message (url, rollout, --allow-downgrade and the rest)
    is signed with the fleet key (--key), and devices refuse it if any field changes.

    Examples: `edged fleet publish digits-2.0.0.tar.gz --key keys/edged.key --group line1 --url http://10.0.0.5:8000/ --canary 10`;
    `edged fleet publish digits-2.0.0.tar.gz --key keys/edged.key --devices press-07 --url http://10.0.0.5:8000/`;
    `edged fleet publish digits-2.0.0.tar.gz --group line1 --clear`.
    """
    from edged.fleet import build_message, publish, read_archive_manifest, topics_for, unpublish

    device_list = [d.strip() for d in (devices or "").split(",") if d.strip()]
    if not clear and not url:
        _fail("--url is required: where devices download the archive, e.g. --url http://10.0.0.5:8000/")
    try:
        target = _broker(broker, topic_prefix, config)
        if clear:
            manifest, _ = read_archive_manifest(archive)
            topics = topics_for(target, manifest.name, group, device_list)
            unpublish(target, topics)
            typer.echo(f"cleared {', '.join(topics)}")
            return
        message = build_message(archive, url, device_list if group else [], canary, allow_downgrade, allow_unsigned,
                                fleet_key=key)
        topics = topics_for(target, message.model, group, device_list)
        publish(target, topics, message.to_json())
    except EdgedError as exc:
        _fail(str(exc))
    signed = f"intent signed by key {message.intent_signature.key_id}" if message.intent_signature else "UNSIGNED intent"
    typer.echo(f"published {message.model} {message.version} ({message.size} bytes, sha256 {message.sha256[:12]}…, "
               f"{signed}) to {', '.join(topics)}")


def fleet_status(
    group: Optional[str] = typer.Option(None, "--group", "-g", help="Only devices in this group."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Keep the table live until Ctrl-C (into a pipe or file: print it again on each change)."),
    as_json: bool = typer.Option(False, "--json", help="Print rows as JSON instead of a table."),
    wait: float = typer.Option(2.0, "--wait", help="Seconds to gather retained statuses before printing."),
    broker: str = BROKER_OPTION,
    topic_prefix: str = PREFIX_OPTION,
    config: Optional[Path] = CONFIG_OPTION,
) -> None:
    """Show devices with their model versions and update states, from their retained
    PREFIX/DEVICE/status and PREFIX/DEVICE/ota/status topics.

    Examples: `edged fleet status --group line1 --watch` (live until Ctrl-C);
    `edged fleet status --json` for scripts."""
    from edged.fleet import StatusCollector

    try:
        collector = StatusCollector(_broker(broker, topic_prefix, config))
        collector.start()
    except EdgedError as exc:
        _fail(str(exc))
    try:
        time.sleep(wait)
        if as_json:
            typer.echo(json.dumps([r.to_dict() for r in collector.snapshot(group)], indent=2))
            return
        from rich.console import Console

        console = Console()
        if not watch:
            console.print(_table(collector.snapshot(group), group))
            return
        if not console.is_terminal:
            _print_changes(collector, group, console)
        from rich.live import Live

        with Live(_table(collector.snapshot(group), group), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(0.5)
                live.update(_table(collector.snapshot(group), group))
    except KeyboardInterrupt:
        pass
    finally:
        collector.stop()


def _print_changes(collector, group: Optional[str], console) -> None:
    """`--watch` into a file or pipe (no terminal to redraw): print the table
    again each time the devices' rows change, until Ctrl-C."""
    shown = None
    while True:
        rows = collector.snapshot(group)
        current = json.dumps([r.to_dict() for r in rows], sort_keys=True, default=str)
        if current != shown:
            console.print(_table(rows, group))
            console.file.flush()
            shown = current
        time.sleep(0.5)


def _table(rows, group: Optional[str]):
    from rich.table import Table

    table = Table(title=f"edged fleet{' — group ' + group if group else ''} ({len(rows)} devices)")
    for column in ("device", "online", "groups", "model", "active", "state", "target", "progress", "reason"):
        table.add_column(column)
    colors = {"active": "green", "watching": "cyan", "refused": "red", "failed": "red", "rolled_back": "yellow"}
    for row in rows:
        models = row.models or {"": {}}
        for i, (name, info) in enumerate(sorted(models.items())):
            state = str(info.get("state", ""))
            progress = info.get("progress") or {}
            pct = f"{100 * progress['bytes'] / progress['total']:.0f}%" if progress.get("total") else ""
            table.add_row(
                row.device if i == 0 else "", row.online if i == 0 else "", ",".join(row.groups) if i == 0 else "",
                name, str(info.get("active", "")), f"[{colors.get(state, 'white')}]{state}[/]",
                str(info.get("target", "")), pct, str(info.get("reason", ""))[:60],
            )
    return table


def register(app: typer.Typer, bundle_app: typer.Typer) -> None:
    """Add these commands to the main `edged` app."""
    keys_app.command("generate")(keys_generate)
    bundle_app.command("sign")(bundle_sign)
    bundle_app.command("pack")(bundle_pack)
    fleet_app.command("serve")(fleet_serve)
    fleet_app.command("publish")(fleet_publish)
    fleet_app.command("status")(fleet_status)
    app.add_typer(keys_app, name="keys")
    app.add_typer(fleet_app, name="fleet")
