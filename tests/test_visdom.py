"""Visualizer and Visdom plumbing against real `python -m visdom.server` processes on
free loopback ports: recording and replay without a server, a server that hangs, dies
or restarts mid-run, another HTTP server on the port, warnings in the log pane, the
confusion matrix's counts, galleries, the offline assets and the run.sh wrapper.
main is imported inside the tests that drive its commands."""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from unittest import mock

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from utils import visdom_assets, visdom_server
from utils.errors import UserError
from utils.visualize import LINE_HEIGHT, Visualizer, captioned, replay


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(tmp_path, port=None):
    port = port or free_port()
    process = visdom_server.start(port, env_path=str(tmp_path / f'envs{port}'), bind_local=True)
    return port, process


@pytest.fixture
def server(tmp_path):
    port, process = start_server(tmp_path)
    yield port, process
    visdom_server.stop(process)


def windows(port, env):
    """{window: its data} as the server holds it."""
    reply = requests.post(f'http://localhost:{port}/win_data',
                          data=json.dumps({'eid': env, 'win': None}), timeout=5)
    if reply.status_code != 200:  # no such env yet
        return {}
    return {win: json.loads(data) if isinstance(data, str) else data
            for win, data in reply.json().items()}


def points(port, env, win):
    """{line name: number of points} of a line chart on the server."""
    data = windows(port, env).get(win)
    return {t['name']: len(t['x']) for t in data['content']['data']} if data else {}


def wait_for(condition, timeout=20):
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_no_server_warns_once_records_and_replays(tmp_path):
    import main
    port = free_port()
    record = tmp_path / 'run' / 'visdom.log'
    with pytest.warns(UserWarning) as caught:
        vis = Visualizer(env='rec', port=port, record_file=str(record))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f'python -m visdom.server -port {port}' in message and str(record) in message
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no further warning, and no traceback printed
        for i in range(200):
            vis.plot('train loss', 1.0 / (i + 1))
        vis.plot_lines('accuracy', {'train': 60.0, 'val': 55.0})
        vis.confusion('cm', np.array([[5, 1], [2, 4]]))
    assert time.perf_counter() - started < 2.0
    vis.close()
    assert len(record.read_text().splitlines()) >= 204

    with pytest.raises(UserError, match='no Visdom server'):
        main.replay(str(record), vis_port=port)
    with pytest.raises(UserError, match='no such recorded Visdom log'):
        main.replay(str(tmp_path / 'missing.log'), vis_port=port)
    port, process = start_server(tmp_path, port)
    try:
        main.replay(str(record), vis_port=port)
        assert points(port, 'rec', 'train loss') == {'train loss': 200}
        assert points(port, 'rec', 'accuracy') == {'train': 1, 'val': 1}
        assert 'cm' in windows(port, 'rec')
    finally:
        visdom_server.stop(process)


def test_hung_then_dead_server_costs_nothing_and_plotting_resumes(tmp_path, server):
    port, process = server
    vis = Visualizer(env='outage', port=port, retry_every=0.2)
    for i in range(5):
        vis.plot('loss', i)
    vis.log('before the outage')
    # catch_up: a loaded machine may have made the sender miss the server for a moment
    assert wait_for(lambda: (vis.catch_up(), points(port, 'outage', 'loss'))[1] == {'loss': 5})

    process.send_signal(signal.SIGSTOP)  # accepts connections, never answers: timeouts
    try:
        started = time.perf_counter()
        for i in range(5, 305):
            vis.plot('loss', i)
        elapsed = time.perf_counter() - started
    finally:
        process.send_signal(signal.SIGCONT)
    assert elapsed < 1.0, f'300 plot calls took {elapsed:.2f}s with a hung server'

    process.kill()  # gone: a new, empty server comes up on the same port
    process.wait()
    _, process = start_server(tmp_path, port)
    try:
        vis.plot('loss', 305)  # may come before the sender notices the server: then dropped
        assert wait_for(lambda: (vis.catch_up(), redrawn(port, 'outage'))[1]), \
            windows(port, 'outage')
    finally:
        vis.close()
        visdom_server.stop(process)


def redrawn(port, env, loss_points=306):
    """Both panes back in full. The redraw posts them one after the other, so waiting
    for the chart alone may read the server before the log pane arrives."""
    wins = windows(port, env)
    loss = wins.get('loss')
    return (loss is not None and len(loss['content']['data'][0]['x']) == loss_points
            and 'before the outage' in wins.get('log', {}).get('content', ''))


def test_restart_between_plots_redraws_every_pane(tmp_path, server):
    """No plot fails while the server restarts, so only the new connection tells: a
    visdom server makes a missing chart from an append alone, with one point."""
    port, process = server
    vis = Visualizer(env='restart', port=port, retry_every=0.2)
    for i in range(5):
        vis.plot('loss', i)
    vis.log('before the outage')
    assert wait_for(lambda: (vis.catch_up(), redrawn(port, 'restart', 5))[1])
    process.kill()
    process.wait()
    _, process = start_server(tmp_path, port)
    try:
        vis.plot('loss', 5)
        assert wait_for(lambda: (vis.catch_up(), redrawn(port, 'restart', 6))[1]), \
            windows(port, 'restart')
    finally:
        vis.close()
        visdom_server.stop(process)


@pytest.fixture
def http_server(tmp_path):
    """`python -m http.server` on a free port, serving tmp_path/site; returns the port
    and a function counting the POSTs it was sent (it answers them 501)."""
    site, log = tmp_path / 'site', tmp_path / 'http.log'
    site.mkdir()
    port = free_port()
    with open(log, 'w') as stderr:
        process = subprocess.Popen([sys.executable, '-m', 'http.server', str(port), '--bind',
                                    '127.0.0.1', '--directory', str(site)],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    assert wait_for(lambda: visdom_server.what_answers(port) == 'other')
    yield port, site, lambda: log.read_text().count('"POST ')
    process.terminate()
    process.wait()


def test_another_http_server_on_the_port_is_not_taken_for_visdom(tmp_path, http_server):
    port, _, posts = http_server
    record = tmp_path / 'visdom.log'
    with pytest.warns(UserWarning) as caught:
        vis = Visualizer(env='other', port=port, record_file=str(record), retry_every=0.2)
        for i in range(50):
            vis.plot('loss', i)
        vis.confusion('cm', np.eye(2))
        time.sleep(0.5)  # a few probes
        vis.plot('loss', 50)
        vis.close()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and f'http://localhost:{port} answers, but it is not a Visdom ' \
        'server' in messages[0], messages
    assert posts() == 0 and len(record.read_text().splitlines()) >= 52  # recorded, not posted
    with pytest.raises(UserError, match=f'localhost:{port} answers, but it is not a Visdom'):
        replay(str(record), port=port)


def test_a_server_refusing_plots_is_told_once_then_left_alone(tmp_path, http_server):
    """A page titled like Visdom's, but POSTs answered 501: one warning, then the
    plots are only recorded (a probe every retry_every seconds posts one more)."""
    port, site, posts = http_server
    (site / 'index.html').write_text('<html><head><title>visdom</title></head></html>')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        vis = Visualizer(env='refused', port=port, retry_every=30)
        vis.plot('loss', 0)
        assert wait_for(lambda: vis.sender.rejected == 501, timeout=10)
        for i in range(1, 53):
            vis.plot('loss', i)
        vis.close()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and f':{port} answered a plot with HTTP 501: it is not a ' \
        'Visdom server' in messages[0], messages
    assert posts() == 1


@pytest.mark.parametrize('url', ['not a url', 'localhost', 'ftp://localhost', 'http://',
                                 'http://localhost:8097', 'http://localhost/visdom'])
def test_a_bad_server_url_is_one_line_naming_the_option(url):
    with pytest.raises(UserError) as caught:
        visdom_server.check_server_url(url)
    message = str(caught.value)
    assert message.startswith(f'--vis_server={url!r}: ') and 'http://localhost' in message
    assert '\n' not in message
    with pytest.raises(UserError, match='--vis_server'):
        Visualizer(server=url)


def test_good_server_urls_pass():
    assert visdom_server.check_server_url('http://localhost') == 'http://localhost'
    assert visdom_server.check_server_url('https://vis.example.org/') == 'https://vis.example.org'
    assert visdom_server.check_server_url('http://127.0.0.1') == 'http://127.0.0.1'


def test_warnings_reach_the_log_pane_until_close(tmp_path):
    record = tmp_path / 'visdom.log'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        vis = Visualizer(env='warn', port=free_port(), record_file=str(record))
        warnings.warn('3 images could not be read <corrupt>')
        vis.close()
        warnings.warn('after close')
    assert len(caught) == 3  # still shown as usual
    texts = [msg['data'][0]['content'] for endpoint, msg in map(json.loads, record.open())
             if msg['data'][0]['type'] == 'text']
    assert 'warning: no Visdom server' in texts[-1]
    assert 'warning: 3 images could not be read &lt;corrupt&gt;' in texts[-1]
    assert 'after close' not in texts[-1]


def test_image_grid_denormalises_and_captions_each_image(tmp_path):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    pixels = torch.full((2, 3, 32, 32), 0.25)
    pixels[:, :, :16] = 0.75
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    record = tmp_path / 'visdom.log'
    with pytest.warns(UserWarning):
        vis = Visualizer(env='grid', port=free_port(), record_file=str(record))
    vis.img_grid('batch', normalised, ['cat', 'dog'], mean=mean, std=std)
    vis.close()
    endpoint, msg = json.loads(record.read_text().splitlines()[-1])
    content = msg['data'][0]['content']
    assert msg['win'] == 'batch' and content['caption'] == '1 cat, 1 dog'
    png = base64.b64decode(content['src'].split(',', 1)[1])
    grid = np.asarray(Image.open(io.BytesIO(png)))
    corner = 3  # visdom's grid: a 1-pixel border plus the 2-pixel padding
    assert abs(int(grid[corner, corner, 0]) - 191) <= 1  # the original pixels, not the normalised
    assert abs(int(grid[corner + 95, corner, 0]) - 64) <= 1

    tile = captioned(pixels[0].numpy(), 'cat')
    assert tile.shape == (3, 96 + 14, 96)  # shown 96 pixels wide, caption strip below
    assert abs(int(tile[0, 0, 0]) - 191) <= 1 and abs(int(tile[0, 95, 0]) - 64) <= 1
    assert captioned(np.zeros((3, 224, 224)), 'dog').shape == (3, 96 + 14, 96)
    strip = tile[:, 96:]
    assert (strip < 128).any() and (strip == 255).any()  # dark text on white


def test_confusion_cells_show_the_counts_true_class_by_row(tmp_path):
    record = tmp_path / 'visdom.log'
    with pytest.warns(UserWarning):
        vis = Visualizer(env='cm', port=free_port(), record_file=str(record))
    vis.confusion('cm', np.array([[50, 3], [7, 40]]))
    vis.close()
    endpoint, msg = json.loads(record.read_text().splitlines()[-1])
    cells = {(a['y'], a['x']): a['text'] for a in msg['layout']['annotations']}
    assert cells == {('true cat', 'predicted cat'): '50', ('true cat', 'predicted dog'): '3',
                     ('true dog', 'predicted cat'): '7', ('true dog', 'predicted dog'): '40'}
    [heatmap] = msg['data']
    # plotly puts the first row at the bottom: the cell under each count holds that count
    assert all(heatmap['z'][heatmap['y'].index(y)][heatmap['x'].index(x)] == float(text)
               for (y, x), text in cells.items())


def test_gallery_of_three_line_captions_reaches_the_server(server):
    port, _ = server
    vis = Visualizer(env='gallery', port=port)
    images = torch.rand(5, 3, 64, 48)
    captions = [f'{"dog" if i % 2 else "cat"}\nP(dog)={i / 5:.2f}\ndog.{12340 + i}.jpg'
                for i in range(5)]
    vis.gallery('mistakes', images, captions, title='most confident mistakes')
    vis.close()
    pane = wait_for(lambda: windows(port, 'gallery').get('mistakes'))
    assert pane and pane['type'] == 'image' and pane['title'] == 'most confident mistakes'
    png = base64.b64decode(pane['content']['src'].split(',', 1)[1])
    tile_height = round(128 * 64 / 48) + 2 + 3 * LINE_HEIGHT
    # visdom's grid: 4 tiles to a row, each with 2 pixels of padding all round
    assert Image.open(io.BytesIO(png)).size == (4 * (128 + 4), 2 * (tile_height + 4))


def test_three_caption_lines_each_get_their_own_band_inside_the_tile():
    tile = captioned(np.zeros((3, 64, 48)), 'dog\nP(dog)=0.97\ndog.12499.jpg', width=128, lines=3)
    strip = tile[:, round(128 * 64 / 48):].min(axis=0)  # dark where any channel is
    inked = (strip < 128).any(axis=1)
    bands = np.flatnonzero(np.diff(inked.astype(int)) == 1)  # where the ink starts
    assert len(bands) == 3, inked.astype(int)  # three lines, apart from one another
    assert not inked[-1] and not (strip[:, -1] < 128).any()  # nothing cut at the edges


def test_training_without_server_records_a_replayable_log(fast_options, tmp_path):
    import main
    with pytest.warns(UserWarning, match='no Visdom server'):
        main.train(**dict(fast_options, vis=True, vis_port=free_port(), env='offline',
                          print_freq=1))
    [log] = [f for f in os.listdir(fast_options['checkpoint_dir']) if f.endswith('.log')]
    wins = {json.loads(line)[1]['win'] for line in open(os.path.join(fast_options['checkpoint_dir'], log))}
    assert {'train loss', 'accuracy', 'lr', 'val log loss', 'val confusion matrix', 'log',
            'first training batch'} <= wins


def test_run_with_server_stops_only_the_server_it_started(tmp_path, server, monkeypatch):
    monkeypatch.setattr(sys.stdin, 'isatty', lambda: False)
    probe = 'import sys, urllib.request; urllib.request.urlopen("http://localhost:%d/", timeout=5)'
    port = free_port()
    assert visdom_server.run_with_server(
        [sys.executable, '-c', probe % port, f'--vis_port={port}']) == 0
    assert not visdom_server.page_answers(port)

    # killed mid-run (SIGTERM to the wrapper): the run ends, and so does its server
    wrapper = subprocess.Popen([sys.executable, '-m', 'utils.visdom_server', sys.executable,
                                '-c', 'import time; time.sleep(60)', f'--vis_port={port}'],
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    assert wait_for(lambda: visdom_server.page_answers(port), timeout=60)
    wrapper.terminate()
    assert wrapper.wait(timeout=30) != 0
    assert not visdom_server.page_answers(port)

    running, process = server
    assert visdom_server.run_with_server(
        [sys.executable, '-c', probe % running, '--vis_port', str(running)]) == 0
    assert process.poll() is None and visdom_server.page_answers(running)


def test_offline_assets_leave_visdom_nothing_to_download(capsys):
    import main
    static = os.path.join(visdom_assets.visdom_dir(), 'static')
    assert visdom_assets.is_installed(static), 'run `python main.py visdom_setup`'
    main.run(['visdom_setup'])  # idempotent: nothing fetched again
    assert capsys.readouterr().out.strip() == 'Visdom page assets already installed'
    with open(os.path.join(static, 'version.built')) as f:
        import visdom
        assert f.read() == visdom.__version__

    import visdom.server.build as build
    fetched = []

    class NoNetwork:
        def open(self, request):
            fetched.append(request.full_url)
            raise OSError('offline')

    with mock.patch.object(build.request, 'build_opener', lambda *a: NoNetwork()), \
            mock.patch.object(build.request, 'install_opener', lambda opener: None), \
            mock.patch.object(requests, 'get', lambda url, *a, **k: fetched.append(url)):
        build.download_scripts()
    assert fetched == []


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))
    with pytest.raises(UserError, match='npm not found.*apt-get install npm'):
        visdom_assets.install(target=str(tmp_path / 'visdom'))
