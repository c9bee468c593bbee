"""The Visdom page's scripts, stylesheets and fonts, installed from the npm registry.

At every start `python -m visdom.server` downloads these from CDNs (unpkg, cdn.plot.ly,
d3js.org, cdnjs) unless its static folder holds them all and `static/version.built`
holds visdom's version; MathJax it fetches whenever a file is missing, and with no
network that fetch crashes the server. Behind a firewall the page stays blank.
`install()` fetches the same files, at the versions visdom names, with `npm pack`
(which honours npm's registry and proxy settings, e.g. a mirror) and marks them built.

    python main.py visdom_setup      # or: python -m utils.visdom_assets
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from utils.errors import UserError

VISDOM_VERSION = '0.2.4'  # the visdom whose build.py the table below mirrors
BOOTSTRAP = 'bootstrap@3.3.7'
GLYPHS = 'dist/fonts/glyphicons-halflings-regular'
# file under visdom/static/ -> (npm package@version, path inside the package)
FILES = {
    'js/jquery.min.js': ('jquery@3.1.1', 'dist/jquery.min.js'),
    'js/bootstrap.min.js': (BOOTSTRAP, 'dist/js/bootstrap.min.js'),
    'js/react-react.min.js': ('react@16.2.0', 'umd/react.production.min.js'),
    'js/react-dom.min.js': ('react-dom@16.2.0', 'umd/react-dom.production.min.js'),
    'js/react-modal.min.js': ('react-modal@3.1.10', 'dist/react-modal.min.js'),
    'js/plotly-plotly.min.js': ('plotly.js-dist-min@2.11.1', 'plotly.min.js'),
    'js/sjcl.js': ('sjcl@1.0.7', 'sjcl.js'),
    'js/layout-bin-packer.js.map': ('layout-bin-packer@1.4.0', 'dist/layout-bin-packer.js.map'),
    'js/layout_bin_packer.js': ('layout-bin-packer@1.4.0', 'dist/layout-bin-packer.js'),
    'js/d3.v3.min.js': ('d3@3.5.17', 'd3.min.js'),
    'js/d3-selection-multi.v1.js': ('d3-selection-multi@1.0.1', 'build/d3-selection-multi.js'),
    'js/saveSvgAsPng.js': ('save-svg-as-png@1.4.17', 'lib/saveSvgAsPng.js'),
    'css/react-resizable-styles.css': ('react-resizable@1.4.6', 'css/styles.css'),
    'css/react-grid-layout-styles.css': ('react-grid-layout@0.16.3', 'css/styles.css'),
    'css/bootstrap.min.css': (BOOTSTRAP, 'dist/css/bootstrap.min.css'),
    # visdom stores classnames' main file under fonts/, without an extension
    'fonts/classnames': ('classnames@2.2.5', 'index.js'),
    'fonts/glyphicons-halflings-regular.eot': (BOOTSTRAP, GLYPHS + '.eot'),
    'fonts/glyphicons-halflings-regular.woff2': (BOOTSTRAP, GLYPHS + '.woff2'),
    'fonts/glyphicons-halflings-regular.woff': (BOOTSTRAP, GLYPHS + '.woff'),
    'fonts/glyphicons-halflings-regular.ttf': (BOOTSTRAP, GLYPHS + '.ttf'),
    # the browser asks for the .svg; visdom checks for the name with the URL fragment
    'fonts/glyphicons-halflings-regular.svg': (BOOTSTRAP, GLYPHS + '.svg'),
    'fonts/glyphicons-halflings-regular.svg#glyphicons_halflingsregular': (BOOTSTRAP, GLYPHS + '.svg'),
}
MATHJAX = 'mathjax@2.7.5'
MATHJAX_DIR = 'js/mathjax/2.7.5'
# MathJax loads its input/output jax, extensions and fonts on demand, so the page needs
# more than the eight files visdom fetches; the PNG/SVG/EOT fonts and sources are left out.
MATHJAX_PARTS = ('MathJax.js', 'config/', 'extensions/', 'jax/', 'localization/',
                 'fonts/HTML-CSS/TeX/woff/', 'fonts/HTML-CSS/TeX/otf/')
NPM_HELP = ('install Node.js and npm (Debian/Ubuntu: apt-get install npm; other systems: '
            'https://nodejs.org), then run `python main.py visdom_setup` again')


def visdom_dir():
    import visdom
    return os.path.dirname(os.path.abspath(visdom.__file__))


def table_digest():
    """Changes whenever the table does, so an edited table reinstalls."""
    table = json.dumps([FILES, MATHJAX, MATHJAX_PARTS], sort_keys=True)
    return hashlib.sha256(table.encode()).hexdigest()[:16]


def read(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


def is_installed(static):
    import visdom
    if (read(os.path.join(static, '.offline-assets')) != table_digest()
            or read(os.path.join(static, 'version.built')) != visdom.__version__):
        return False
    names = [*FILES, os.path.join(MATHJAX_DIR, 'MathJax.js')]
    return all(os.path.isfile(os.path.join(static, name)) for name in names)


def npm_pack(specs, folder):
    """Download the tarballs of `specs` with the npm client; {spec: tarball path}."""
    npm = shutil.which('npm')
    if npm is None:
        raise UserError(f'npm not found: the offline Visdom page is built from npm packages; '
                        f'{NPM_HELP}')
    result = subprocess.run([npm, 'pack', '--json', '--pack-destination', folder, *specs],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f'`npm pack {" ".join(specs)}` failed: {result.stderr.strip()[-800:]}\n'
                        f'check that npm reaches its registry (`npm ping`); behind a firewall '
                        f'set a mirror, e.g. `npm config set registry https://registry.npmmirror.com`')
    packed = json.loads(result.stdout)
    return {spec: os.path.join(folder, entry['filename']) for spec, entry in zip(specs, packed)}


def extract_members(tarball, wanted):
    """{path inside the package: bytes} for every member whose path starts with one of
    `wanted` (npm tarballs put everything under package/)."""
    found = {}
    with tarfile.open(tarball) as tar:
        for member in tar:
            path = member.name.split('/', 1)[-1]
            if member.isfile() and path.startswith(wanted):
                found[path] = tar.extractfile(member).read()
    return found


def write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.part'
    with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def install(target=None, force=False, quiet=False):
    """Put every asset of the Visdom page into `target`/static (default: the installed
    visdom package) and mark it built. Returns False when it was already complete."""
    import visdom
    target = target or visdom_dir()
    static = os.path.join(target, 'static')
    if not force and is_installed(static):
        return False
    if visdom.__version__ != VISDOM_VERSION:
        print(f'warning: these assets are the ones visdom {VISDOM_VERSION} asks for; '
              f'visdom {visdom.__version__} is installed', file=sys.stderr)
    try:
        os.makedirs(static, exist_ok=True)
        writable = os.access(static, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise UserError(f'cannot write to {static}: run `python main.py visdom_setup` as the '
                        f'user that installed visdom (or inside your virtualenv)')
    specs = sorted({spec for spec, _ in FILES.values()} | {MATHJAX})
    if not quiet:
        print(f'fetching the Visdom page assets from npm: {", ".join(specs)}')
    with tempfile.TemporaryDirectory() as tmp:
        tarballs = npm_pack(specs, tmp)
        for spec, tarball in tarballs.items():
            if spec == MATHJAX:
                members = extract_members(tarball, MATHJAX_PARTS)
                for path, data in members.items():
                    write_file(os.path.join(static, MATHJAX_DIR, path), data)
                continue
            wanted = {name: inner for name, (s, inner) in FILES.items() if s == spec}
            members = extract_members(tarball, tuple(wanted.values()))
            for name, inner in wanted.items():
                if inner not in members:
                    raise UserError(f'{spec} on npm has no {inner}: the asset table in '
                                    f'{__file__} does not match this package')
                write_file(os.path.join(static, name), members[inner])
    # visdom skips its CDN downloads only when this file holds exactly its version
    write_file(os.path.join(static, 'version.built'), visdom.__version__.encode())
    write_file(os.path.join(static, '.offline-assets'), table_digest().encode())
    if not quiet:
        print(f'Visdom page assets installed in {static}: `python -m visdom.server` '
              f'now starts without network access')
    return True


if __name__ == '__main__':
    try:
        install(force='--force' in sys.argv)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        sys.exit(2)
