"""Ray kept on this machine: the embedded Ray of `raytron submit`, and nodes that `raytron cluster start`
gives a loopback address, bind every service to 127.0.0.1; the embedded one also runs with token auth.

Ray 2.60 chooses its binds from the node address: the gRPC servers (GCS, raylet, object manager, every
worker), the dashboard agent's gRPC server and the metrics exporter listen on all interfaces unless the
node address is loopback, and the agents' HTTP servers bind the node address. With its multi-node mode on
(the default on Linux) Ray also replaces a loopback node address (`ray.init(_node_ip_address=...)`,
`ray start --node-ip-address`) and a loopback bootstrap address (`127.0.0.1:PORT`) by the machine's
network address (`ray._private.services.resolve_ip_for_localhost`), so asking for 127.0.0.1 alone binds
everything to every interface. Ray's one-machine switch, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, keeps
loopback as loopback. Ray reads it when `ray._private.ray_constants` is imported, so this process sets
the constant too; every Ray process started from here inherits the variable.
"""

from __future__ import annotations

import os
import secrets
import sys

from ..typed import ConfigError
from .cluster import AUTH_MODE_ENV, TOKEN_ENV, find_token, is_loopback

SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


def check_token_auth(env: dict[str, str] | None = None) -> None:
    """The embedded Ray runs with token authentication: any RAY_AUTH_MODE other than `token` is refused
    (without a token any process on this machine can attach as a driver and run code in the workers)."""
    env = os.environ if env is None else env
    mode = env.get(AUTH_MODE_ENV, "").strip()
    if mode and mode.lower() != "token":
        raise ConfigError(AUTH_MODE_ENV, f"is {mode!r}, but the embedded Ray runs with token authentication: "
                                         "without it any process on this machine can attach to the run's Ray "
                                         f"and run code in its workers; unset {AUTH_MODE_ENV} (or set it to token)")


def embedded_auth(env: dict[str, str] | None = None) -> None:
    """Token auth on for the Ray this process starts. Without a token anywhere Ray looks, the run gets
    its own in memory ($RAY_AUTH_TOKEN, inherited by its Ray processes, written nowhere)."""
    env = os.environ if env is None else env
    check_token_auth(env)
    env[AUTH_MODE_ENV] = "token"
    if find_token(env) is None:
        env[TOKEN_ENV] = secrets.token_hex(32)


def pin_loopback() -> None:
    """This process, and the Ray processes it starts, keep a loopback address as loopback."""
    import ray._private.ray_constants as ray_constants

    os.environ[SINGLE_HOST_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def loopback_address(address: str) -> bool:
    """Whether a Ray address (HOST:PORT, ray://HOST:PORT) names this machine's loopback."""
    host = address.split("://", 1)[-1].rstrip("/").rpartition(":")[0] or address
    return is_loopback(host.strip("[]"))


def join(address: str, **init_kwargs) -> None:
    """ray.init() on an existing cluster. A loopback one (`raytron cluster start` on this machine) is
    reached at 127.0.0.1, which Ray would otherwise replace by the machine's network address, where
    nothing listens."""
    import ray

    if loopback_address(address):
        pin_loopback()
    ray.init(address=address, **init_kwargs)


def loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 (`lo` on Linux, `lo0` on macOS)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == LOOPBACK for a in addrs):
            return name
    return None


def init_embedded(num_cpus: int, include_dashboard: bool) -> None:
    """A fresh Ray instance of this process's own, every service on 127.0.0.1, token auth on. The
    workers' collectives stay on loopback too: gloo and NCCL sockets on the loopback interface (unless
    the environment names one), the rendezvous in a file (PreemptibleTorchConfig.local_rendezvous)."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    embedded_auth()
    # Ray caches its config and token when first imported (here possibly before the lines above): reload
    # both, as Ray itself does when it turns token auth on.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    pin_loopback()
    iface = loopback_interface()
    if iface:
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # inherited by the workers
            os.environ.setdefault(var, iface)
    # address="local": never a cluster already on the host (`ray start`, or a stale
    # /tmp/ray/ray_current_cluster), which a bare ray.init() would join.
    ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=num_cpus, include_dashboard=include_dashboard,
             dashboard_host=LOOPBACK, log_to_driver=True, configure_logging=True, logging_level="WARNING")


def main(argv: list[str] | None = None) -> None:
    """`python -m raytron.launcher.ray_loopback start ARGS`: Ray's `ray start` for a loopback node.

    This CLI process keeps Ray's multi-node mode (a worker node may join a loopback head) but takes
    loopback addresses as given; the node's processes, and the drivers of its jobs, inherit the one-machine
    switch, so they resolve 127.0.0.1 to 127.0.0.1 as well."""
    from ray._private import ray_constants, services
    from ray.scripts.scripts import main as ray_main

    ray_constants.ENABLE_RAY_CLUSTER = True  # whatever this environment says: worker nodes may join
    resolve = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host if is_loopback(host) else resolve(host)
    os.environ[SINGLE_HOST_ENV] = "0"  # for the children only: this process stays multi-node
    sys.argv = ["ray", *(sys.argv[1:] if argv is None else argv)]
    ray_main()


if __name__ == "__main__":
    main()
