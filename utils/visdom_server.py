"""Start a local Visdom server when none answers, and stop only the one started here.

    python -m utils.visdom_server python main.py demo [options]

runs the command with a server on --vis_port (default 8097): `./run.sh` uses it.
"""
import http.client
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

from utils.errors import UserError

LOCAL_HOSTS = ('localhost', '127.0.0.1')
# The defaults of config.py's --vis_server, --vis_port and --env (config reads them here).
DEFAULT_SERVER, DEFAULT_PORT, DEFAULT_ENV = 'http://localhost', 8097, 'default'
# Straight to the server: an http_proxy without a no_proxy for localhost must not hide it.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Visdom's page (and its login page) is titled "visdom"; another server on the port is not.
VISDOM_TITLE = re.compile(rb'<title>\s*visdom', re.IGNORECASE)


def check_server_url(url):
    """`url` without a trailing slash when it is an http(s) URL with a host and nothing
    else (visdom adds --vis_port itself); else a one-line UserError naming the option."""
    try:
        parsed = urlparse(str(url))
        port = parsed.port
    except ValueError:  # e.g. http://host:abc or http://[::1
        parsed, port = urlparse(''), None
    if parsed.scheme not in ('http', 'https') or not parsed.hostname:
        problem = 'not an http(s) URL with a host'
    elif port is not None:
        problem = 'the port goes in --vis_port'
    elif parsed.path.strip('/') or parsed.query or parsed.fragment or parsed.username:
        problem = 'give the address alone, without a path, query or user'
    else:
        return str(url).rstrip('/')
    raise UserError(f'--vis_server={url!r}: {problem}; a valid one: --vis_server=http://localhost')


def what_answers(port, host='localhost', timeout=1.0, scheme='http'):
    """'visdom' when a Visdom page is served on host:port, 'other' when something else
    answers there (e.g. `python -m http.server`), None when nothing does."""
    try:
        with DIRECT.open(f'{scheme}://{host}:{port}/', timeout=timeout) as reply:
            page = reply.read(65536)  # the title follows the page's script tags
    except urllib.error.HTTPError:  # an HTTP error status: some server, not Visdom's page
        return 'other'
    except OSError:  # refused, unreachable or timed out
        return None
    except http.client.HTTPException:  # something that does not speak HTTP
        return 'other'
    return 'visdom' if VISDOM_TITLE.search(page) else 'other'


def not_visdom(server, port):
    """What to say when what_answers finds 'other'."""
    return (f'{server}:{port} answers, but it is not a Visdom server (another program '
            f'holds the port)')


def page_answers(port, host='localhost', timeout=1.0, scheme='http'):
    """True when a Visdom page is served on host:port."""
    return what_answers(port, host, timeout, scheme) == 'visdom'


def start(port, env_path=None, log_path=None, bind_local=False, timeout=60):
    """A `python -m visdom.server` process on `port`, returned once its page answers."""
    from utils.visdom_assets import install
    try:
        install(quiet=True)  # without the assets the server goes to the CDNs at start
    except UserError as exc:
        print(f'warning: Visdom page assets not installed ({exc}); the server will try '
              f'to download them', file=sys.stderr)
    command = [sys.executable, '-m', 'visdom.server', '-port', str(port),
               '-logging_level', 'WARNING']
    if env_path:
        command += ['-env_path', env_path]
    if bind_local:
        command.append('-bind_local')
    with open(log_path or os.devnull, 'ab') as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # Ctrl-C: to the run, not the server
    deadline = time.monotonic() + timeout
    try:
        while not page_answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                where = f'; its output is in {log_path}' if log_path else ''
                raise UserError(f'the Visdom server on port {port} did not start{where}. '
                                f'Try `python -m visdom.server -port {port}` to see why, '
                                f'or pick a free port with --vis_port')
            time.sleep(0.2)
    except BaseException:  # also Ctrl-C or SIGTERM while waiting: no orphan server
        stop(process)
        raise
    return process


def stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def option(argv, name, default):
    """The value of --name=value or --name value in a main.py command line."""
    for i, arg in enumerate(argv):
        for spelling in (f'--{name}', f'--{name.replace("_", "-")}'):
            if arg.startswith(spelling + '='):
                return arg.split('=', 1)[1]
            if arg == spelling and i + 1 < len(argv):
                return argv[i + 1]
    return default


def wait(child):
    """The child's exit status. Ctrl-C reaches the child too, and training stops on it
    gracefully (it saves a checkpoint), so it is waited for, not killed."""
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            pass


def run_with_server(command):
    """Run `command` (a main.py command line) with a Visdom server on its --vis_port;
    start one when none answers and stop that one afterwards. Returns the exit status."""
    port = int(option(command, 'vis_port', DEFAULT_PORT))
    host = urlparse(option(command, 'vis_server', DEFAULT_SERVER)).hostname
    vis = option(command, 'vis', 'True').lower() not in ('false', '0', 'no')
    env = option(command, 'env', 'demo' if 'demo' in command else DEFAULT_ENV)
    process = child = None
    status = 130

    def on_sigterm(*_):  # `kill` of this wrapper: pass it on; `finally` stops the server
        if child is None:
            raise SystemExit(143)
        child.terminate()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        # another program on the port: starting would fail, and the run's Visualizer says so
        if vis and host in LOCAL_HOSTS and what_answers(port) is None:
            print(f'starting a Visdom server on port {port}')
            try:
                process = start(port)
            except UserError as exc:  # the run goes on, recording its plots
                print(f'warning: {exc}', file=sys.stderr)
        if vis and (process is not None or page_answers(port, host)):
            print(f'Visdom plots: http://{host}:{port}/env/{env}')
        child = subprocess.Popen(command)
        status = wait(child)
        if process is not None and sys.stdin.isatty():
            input(f'Visdom keeps showing the plots at http://localhost:{port}; '
                  f'press Enter to stop the server ')
    except (KeyboardInterrupt, EOFError):
        print()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process is not None:
            stop(process)
            print('Visdom server stopped')
    return status


if __name__ == '__main__':
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    try:
        sys.exit(run_with_server(sys.argv[1:]))
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        sys.exit(2)
