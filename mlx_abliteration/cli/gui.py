"""``mlx-abliterate gui``: the Gradio web UI (the seed's ``python gui.py``)."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.output_dir import check_work_dir
from mlx_abliteration.runtime.logging_config import setup_logging

HELP = "web UI: run the pipeline with live progress, plots and a side-by-side model comparison"
DESCRIPTION = (
    "Serve a Gradio app that runs the same pipeline as `mlx-abliterate run` from a form, streams its "
    "progress, shows the before/after metrics and a per-layer plot of the refusal direction, and "
    "compares the original and the abliterated model on one prompt. Local only unless --share."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to your network)"
    )
    parser.add_argument("--port", type=int, default=None, help="port; when not given, 7860 or the next free one")
    parser.add_argument("--share", action="store_true", help="also open a public *.gradio.live link")
    parser.add_argument(
        "--output-root",
        default=None,
        help="every output dir of the GUI lies inside this folder (default: ./outputs): a relative name such as my_model is taken inside it; paths escaping it are refused",
    )
    parser.add_argument(
        "--log-file",
        help="JSON-lines log file; when not given, $MLX_ABLITERATION_LOG_FILE or ~/.mlx-llm/abliteration-toolkit-cli/log.jsonl",
    )


def main(args: argparse.Namespace) -> int:
    # a file, or a folder this user cannot write: said now, not after a run in the browser
    output_root = check_work_dir(args.output_root or "outputs", "--output-root").resolve()
    try:
        from mlx_abliteration.gui import launch  # noqa: PLC0415  (imports gradio, an optional extra)
    except ModuleNotFoundError as err:
        if err.name not in ("gradio", "matplotlib", "pandas"):
            raise
        raise UserError(f"the GUI needs {err.name}; install it with: pip install 'mlx-abliteration[gui]'") from None
    setup_logging(args.log_file)
    exposed = not is_loopback(args.host)
    if exposed:
        print(
            f"warning: the GUI has no authentication and --host {args.host} makes it reachable from your network: "
            "anyone who can reach this machine can run jobs and write files as you; use --host 127.0.0.1 to keep it local",
            file=sys.stderr,
            flush=True,
        )

    app = launch(args.host, args.port, args.share, output_root=output_root, prevent_thread_lock=True, quiet=True)
    print(f"outputs are written inside {output_root}", file=sys.stderr, flush=True)
    if exposed:
        urls = "  ".join(network_urls(args.host, app.server_port))
        print(f"MLX Abliteration GUI on {urls}  (Ctrl-C stops it)", flush=True)
    else:
        print(f"MLX Abliteration GUI on {app.local_url}  (Ctrl-C stops it)", flush=True)
    if args.share:
        print(f"public link: {app.share_url}", flush=True)
    app.block_thread()
    return 0


def is_loopback(host: str) -> bool:
    """True when ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: loopback only if every address it resolves to is
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def network_urls(host: str, port: int) -> list[str]:
    """The URLs the server really answers on: this machine's addresses for a wildcard host."""

    def url(address: str) -> str:
        return f"http://[{address}]:{port}/" if ":" in address else f"http://{address}:{port}/"

    if host.strip("[]") not in ("0.0.0.0", "::", ""):
        return [url(host.strip("[]"))]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    addresses: list[str] = []
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family)
        addresses += [info[4][0].split("%")[0] for info in infos]
    except OSError:
        pass
    try:  # the address of the default route (a UDP connect sends no packet)
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(("2001:db8::1" if family == socket.AF_INET6 else "192.0.2.1", 9))
            addresses.append(probe.getsockname()[0])
    except OSError:
        pass
    public = sorted({a for a in addresses if not ipaddress.ip_address(a).is_loopback})
    return [url(a) for a in public] + [url("::1" if family == socket.AF_INET6 else "127.0.0.1")]
