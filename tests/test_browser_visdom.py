"""The Visdom page in a real browser: a short training with Visdom on, read back from the
DOM that headless Debian Chromium renders, with every request kept on the machine.

Chromium is driven over the DevTools protocol with websocket-client (a visdom
dependency), so nothing downloads a browser or a driver. `./run.sh test` installs the
chromium package when it is missing. VISDOM_SCREENSHOT=PATH keeps the screenshot (the
README's comes from a demo run, see its Visdom section).
"""
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import websocket

import main
from utils import visdom_assets, visdom_server

CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                  '--disable-component-update', '--no-first-run', '--disable-sync',
                  '--hide-scrollbars']
DEAD_PROXY = 'http://127.0.0.1:9'  # any download the server tries fails at once


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium page over the DevTools protocol; records every request."""

    def __init__(self, profile_dir, timeout=30):
        chromium = shutil.which('chromium')
        if chromium is None:
            pytest.fail('chromium not found: `./run.sh test` installs it '
                        '(apt-get install chromium)')
        port = free_port()
        self.process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f'--user-data-dir={profile_dir}',
             f'--remote-debugging-port={port}', 'about:blank'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.requests = []
        self.next_id = 0
        deadline = time.monotonic() + timeout
        pages = []
        while not pages:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail('chromium did not open its DevTools port')
            time.sleep(0.2)
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list', timeout=2) as r:
                    pages = [t for t in json.load(r) if t['type'] == 'page']
            except OSError:
                pass
        self.ws = websocket.create_connection(pages[0]['webSocketDebuggerUrl'], timeout=timeout)
        self.call('Network.enable')

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({'id': self.next_id, 'method': method, 'params': params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get('method') == 'Network.requestWillBeSent':
                self.requests.append(reply['params']['request']['url'])
            if reply.get('id') == self.next_id:
                assert 'error' not in reply, f'{method}: {reply["error"]}'
                return reply['result']

    def evaluate(self, expression):
        result = self.call('Runtime.evaluate', expression=expression, returnByValue=True)
        assert 'exceptionDetails' not in result, result['exceptionDetails']
        return result['result'].get('value')

    def wait_for(self, expression, timeout=60):
        """Poll `expression` until it is truthy; returns its last value."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return value

    def wait_until_still(self, expression, timeout=20):
        """Wait until `expression` gives the same value twice in a row (animations done)."""
        deadline, last = time.monotonic() + timeout, None
        while (value := self.evaluate(expression)) != last and time.monotonic() < deadline:
            last = value
            time.sleep(0.7)

    def screenshot(self, path):
        with open(path, 'wb') as f:
            f.write(base64.b64decode(self.call('Page.captureScreenshot', format='png')['data']))

    def close(self):
        if getattr(self, 'ws', None):
            self.ws.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# Per pane: its title, its plotly traces (name, number of points) or heatmap cells,
# its heatmap's annotations (row, column, text, the cell's value) and the annotation
# texts drawn with a size, its images (loaded = decoded with a size) and its text lines.
PANES_JS = '''JSON.stringify(Array.from(document.querySelectorAll('.window')).map(w => {
  const plot = w.querySelector('.js-plotly-plot');
  const text = w.querySelector('.content-text');
  const heat = plot && plot.data[0].type === 'heatmap' ? plot.data[0] : null;
  return {
    title: w.querySelector('.bar .pull-right:last-child').textContent,
    traces: plot ? plot.data.map(t => [t.name || t.type, t.type === 'heatmap'
        ? t.z.flat().length : (t.y || []).filter(v => v !== null).length]) : [],
    drawn: plot ? plot.querySelectorAll('.scatterlayer .trace path.js-line, .hm image').length : 0,
    cells: heat ? (plot.layout.annotations || []).map(a =>
        [a.y, a.x, a.text, heat.z[heat.y.indexOf(a.y)][heat.x.indexOf(a.x)]]) : [],
    shown: Array.from(w.querySelectorAll('.annotation-text'))
        .filter(t => t.getBoundingClientRect().width > 0).map(t => t.textContent),
    images: Array.from(w.querySelectorAll('img')).map(i => i.complete && i.naturalWidth > 0),
    caption: Array.from(w.querySelectorAll('img')).map(i => i.alt).join(' '),
    lines: text ? text.innerHTML.split('<br>').filter(l => l.trim()).map(l => l.trim()) : [],
  };
}))'''


@pytest.fixture
def offline_server(tmp_path, monkeypatch):
    """A Visdom server on a free loopback port whose downloads can only fail: it must
    find every page asset installed (`./run.sh test` runs `main.py visdom_setup`)."""
    assert visdom_assets.is_installed(os.path.join(visdom_assets.visdom_dir(), 'static')), \
        'Visdom page assets missing: run `python main.py visdom_setup`'
    for name in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY'):
        monkeypatch.setenv(name, DEAD_PROXY)
    monkeypatch.setenv('no_proxy', 'localhost,127.0.0.1')
    monkeypatch.setenv('NO_PROXY', 'localhost,127.0.0.1')
    port = free_port()
    log = tmp_path / 'server.log'
    process = visdom_server.start(port, env_path=str(tmp_path / 'envs'), log_path=str(log),
                                  bind_local=True)
    yield port, log
    visdom_server.stop(process)


def test_training_page_shows_every_pane(offline_server, fast_options, tmp_path):
    port, server_log = offline_server
    main.train(**dict(fast_options, vis=True, vis_port=port, env='browser', max_epoch=2,
                      print_freq=1))
    browser = Browser(tmp_path / 'profile')
    try:
        browser.call('Emulation.setDeviceMetricsOverride', width=1400, height=1200,
                     deviceScaleFactor=1, mobile=False)
        browser.call('Page.navigate', url=f'http://localhost:{port}/env/browser')
        # all eight panes, the plots drawn, the grid decoded, and the last epoch's log line
        # (the mistakes follow it, so wait for their pane's image too)
        ready = ('document.querySelectorAll(".window").length >= 8 && '
                 'document.querySelectorAll(".js-plotly-plot .main-svg").length >= 5 && '
                 'Array.from(document.images).some(i => i.complete && i.naturalWidth > 0) && '
                 '(document.body.innerText.match(/epoch:1,/g) || []).length == 1 && '
                 'document.body.innerText.includes("epoch 1: most confident mistakes")')
        assert browser.wait_for(ready), browser.evaluate('document.body.innerHTML.slice(0, 2000)')
        browser.wait_until_still('JSON.stringify(Array.from(document.querySelectorAll(".window"))'
                                 '.map(w => w.getBoundingClientRect()))')
        panes = {p['title']: p for p in json.loads(browser.evaluate(PANES_JS))}
        browser.screenshot(os.environ.get('VISDOM_SCREENSHOT') or tmp_path / 'visdom.png')
    finally:
        browser.close()

    assert {'train loss', 'accuracy', 'lr', 'val log loss', 'val confusion matrix', 'log',
            'epoch 1: first training batch'} <= set(panes), sorted(panes)
    batches = -(-len(os.listdir(fast_options['train_data_root'])) * 0.7 // 16)  # about 4
    loss = dict(panes['train loss']['traces'])
    assert loss['train loss'] >= 2 * batches - 2, panes['train loss']
    assert dict(panes['accuracy']['traces']) == {
        'train (cm)': 2, 'train (count)': 2, 'val (cm)': 2, 'val (count)': 2}
    assert dict(panes['lr']['traces']) == {'lr': 2}
    assert dict(panes['val log loss']['traces']) == {'val log loss': 2}
    for title in ('train loss', 'accuracy', 'lr', 'val log loss'):
        assert panes[title]['drawn'] >= 1, f'{title}: no line drawn'
    assert panes['val confusion matrix']['traces'] == [['heatmap', 4]]
    assert panes['val confusion matrix']['drawn'] == 1, 'heatmap not drawn'
    check_confusion_counts(panes['val confusion matrix'], val_per_class=round(40 * 0.3))
    grid = panes['epoch 1: first training batch']
    assert grid['images'] == [True] and 'cat' in grid['caption'] and 'dog' in grid['caption']
    epochs = [line for line in panes['log']['lines'] if 'epoch:' in line]
    assert len(epochs) == 2 and all('val_acc(cm/count)' in line for line in epochs), panes['log']
    check_mistakes_pane(panes, epochs[-1])

    local = f'http://localhost:{port}/'
    outside = [u for u in browser.requests if not u.startswith((local, 'data:', 'blob:'))]
    assert not outside, f'the page reached outside the machine: {outside}'
    assert 'Downloading' not in server_log.read_text()


def check_mistakes_pane(panes, last_epoch):
    """The last validation's most confident mistakes: one gallery image, decoded, with
    as many of them as the epoch's confusion matrix has off its diagonal (up to 16)."""
    (title,) = [t for t in panes if t.startswith('epoch 1: most confident mistakes')]
    cm = json.loads(re.search(r'val_cm:(\[\[.*?\]\])', last_epoch).group(1))
    wrong = cm[0][1] + cm[1][0]
    assert wrong > 0, f'no mistake to show after two short epochs: {last_epoch}'
    assert title == f'epoch 1: most confident mistakes ({min(wrong, 16)} of {wrong}, by loss)'
    assert panes[title]['images'] == [True], panes[title]


def check_confusion_counts(pane, val_per_class):
    """Each cell shows its count, drawn on the page, and rows are the true classes: each
    row adds up to the validation images of its class (the fixture's 40 per class)."""
    assert len(pane['cells']) == 4, pane
    assert all(float(text) == value for _, _, text, value in pane['cells']), pane['cells']
    assert sorted(pane['shown']) == sorted(text for _, _, text, _ in pane['cells']), pane
    rows = {}
    for row, _, text, _ in pane['cells']:
        rows[row] = rows.get(row, 0) + int(text)
    assert rows == {'true cat': val_per_class, 'true dog': val_per_class}, pane['cells']
