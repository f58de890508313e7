"""Security: a local sweep listens on loopback only; checkpoints, YAML and subprocesses are handled safely;
cluster.yaml opens no dashboard, GCS or MLflow port to the world.

The socket test lists the listening TCP sockets of this process and every process it started (Ray's GCS, raylet,
object manager, dashboard agent, workers), by matching the socket inodes in /proc/<pid>/fd with /proc/net/tcp{,6}.
The code checks read the package's source with `ast`, so a comment or a docstring cannot make them pass or fail.
"""

import ast
import ipaddress
import os
import re
from pathlib import Path

import pytest
import ray
import yaml

from sweep.driver import session

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "sweep").rglob("*.py")) + sorted((REPO / "bench").rglob("*.py"))
TCP_LISTEN = "0A"


# --- listening sockets ------------------------------------------------------------------------------------------


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # exited meanwhile
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and parentheses


def descendants(root: int) -> set[int]:
    """root and every process below it."""
    parents = {int(p.name): _parent(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in found]
        found.update(children)
        frontier += children
    return found


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net writes addresses as 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listening_sockets() -> dict[str, tuple]:
    """socket inode -> (address, port) of every listening TCP socket in this network namespace."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:] if Path(table).exists() else []:
            fields = line.split()
            if fields[3] == TCP_LISTEN:
                address, port = fields[1].split(":")
                found[fields[9]] = (_address(address), int(port, 16))
    return found


def sockets_of(pids: set[int]) -> dict[int, set[str]]:
    """pid -> socket inodes it holds open."""
    held = {}
    for pid in pids:
        inodes = set()
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
        except OSError:  # exited, or not ours to read
            continue
        held[pid] = inodes
    return held


def is_loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.mark.timeout(120)
def test_local_ray_listens_on_loopback_only(local_ray):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp on this system: cannot list listening sockets")
    # One trial-like task, so a worker process exists and its sockets are counted too.
    assert ray.get(ray.remote(lambda: os.getpid()).remote()) != os.getpid()
    listening = listening_sockets()
    mine = {pid: inodes & listening.keys() for pid, inodes in sockets_of(descendants(os.getpid())).items()}
    opened = {(pid, listening[inode]) for pid, inodes in mine.items() for inode in inodes}
    servers = {pid for pid, _ in opened}
    assert len(servers) >= 3, f"expected Ray's GCS, raylet and more to listen; found {sorted(opened)}"
    exposed = sorted((pid, Path(f"/proc/{pid}/comm").read_text().strip(), str(a), port)
                     for pid, (a, port) in opened if not is_loopback(a))
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert ray.util.get_node_ip_address() == session.LOOPBACK


# --- the code ------------------------------------------------------------------------------------------------------


def calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def test_sources_are_found():
    assert len(SOURCES) > 10 and any(p.name == "trial.py" for p in SOURCES)


def test_every_torch_load_is_weights_only():
    loads, unsafe = [], []
    for path in SOURCES:
        for node, name in calls(path):
            if name == "torch.load":
                loads.append(where(path, node))
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(where(path, node))
    assert loads, "no torch.load found: the check is looking in the wrong place"
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_yaml_is_read_with_safe_loaders_only():
    import sweep.config.spec

    bad = []
    for path in SOURCES:
        for node, name in calls(path):
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                bad.append(where(path, node))
            elif name == "yaml.load":
                loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
                # The loader must be a class of the module that calls yaml.load, and a SafeLoader.
                module = vars(sweep.config.spec) if path.name == "spec.py" else {}
                cls = module.get(ast.unparse(loader)) if loader is not None else None
                if not (isinstance(cls, type) and issubclass(cls, yaml.SafeLoader)):
                    bad.append(where(path, node))
    assert not bad, f"YAML read without a SafeLoader: {bad}"


def test_no_shell_strings():
    bad = []
    for path in SOURCES:
        for node, name in calls(path):
            shell = any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                        for k in node.keywords)
            if shell or name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                bad.append(where(path, node))
            # A command given as one string goes through no shell, but is the habit this rule is against.
            elif name.startswith("subprocess.") and node.args and isinstance(node.args[0], (ast.Constant,
                                                                                             ast.JoinedStr)):
                bad.append(where(path, node))
    assert not bad, f"shell command strings: {bad}"


def test_no_pickle_loads_of_untrusted_files():
    bad = [where(path, node) for path in SOURCES for node, name in calls(path)
           if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "numpy.load", "np.load")
           and not any(k.arg == "allow_pickle" for k in node.keywords)]
    assert not bad, f"unrestricted unpickling: {bad}"


# --- cluster.yaml -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    path = REPO / "cluster.yaml"
    text = path.read_text(encoding="utf-8")
    return text, yaml.safe_load(text)


def _commands(config: dict, key: str) -> list[str]:
    return [" ".join(str(c).split()) for c in config.get(key, [])]


def test_cluster_yaml_opens_nothing_to_the_world(cluster):
    text, config = cluster
    head = _commands(config, "head_start_ray_commands")
    [ray_start] = [c for c in head if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in ray_start  # reachable only through `ray attach -p 8265`
    uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "0.0.0.0" not in uncommented and "::/0" not in uncommented  # no wildcard bind, no open ingress rule
    for command in head + _commands(config, "worker_start_ray_commands"):
        for flag in ("--node-ip-address", "--dashboard-host", "--ray-client-server-port", "--dashboard-agent-listen"):
            value = re.search(rf"{flag}[= ](\S+)", command)
            assert value is None or value.group(1) not in ("0.0.0.0", "::", "*"), command


def test_cluster_mlflow_server_binds_a_private_address(cluster):
    _, config = cluster
    servers = [c for c in _commands(config, "head_start_ray_commands") if re.search(r"\bmlflow server\s+--", c)]
    assert servers, "cluster.yaml starts no MLflow server: update this test"
    for command in servers:
        host = re.search(r"--host[= ](\S+)", command)
        assert host is not None, f"mlflow server without --host binds its default, check: {command}"
        assert host.group(1) not in ("0.0.0.0", "::", "*"), command
        backend = re.search(r"--backend-store-uri[= ](\S+)", command).group(1)
        assert "@127.0.0.1" in backend or "@localhost" in backend, backend  # PostgreSQL on the head only
