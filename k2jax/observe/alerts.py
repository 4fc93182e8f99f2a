"""Alerts to people: a Slack-compatible webhook, and a watchdog for stalled runs.

K2-V2's monitor polled its jobs and alerted on crashes, loss jumps and stalls; k2jax sends
the same kinds of alert from inside the run. A webhook receives `{"text": "..."}` as JSON,
the format of Slack's incoming webhooks (Mattermost, Discord's /slack endpoint and most chat
tools accept it). Sending happens on a background thread and never raises: an alert that
cannot be delivered is printed and the run goes on.

A webhook URL is a credential (whoever holds it can post to the channel), so it is never
written anywhere: `monitor.webhook_url` names an environment variable (`env:NAME`, the
recommended form), and a URL given directly is used for the run but replaced by its redacted
form (`https://host/<redacted>`) before the config reaches config.json, a checkpoint or W&B.
"""

import json
import os
import queue
import threading
import time
import urllib.parse
import urllib.request

ENV_PREFIX = 'env:'  # monitor.webhook_url=env:NAME reads the URL from $NAME
REDACTED = '<redacted>'

# The same kind of alert at most once per this many seconds (a NaN every step is one alert).
_REPEAT_SECONDS = 600


def webhook_url(setting: str) -> str | None:
  """The URL that `monitor.webhook_url` stands for, or None when alerts are off.
  Raises ValueError (naming the key, never the URL) when it cannot be used."""
  if not setting:
    return None
  if setting.startswith(ENV_PREFIX):
    name = setting[len(ENV_PREFIX) :]
    if not name:
      raise ValueError('monitor.webhook_url=env: names no environment variable (env:NAME)')
    url = os.environ.get(name, '')
    if not url:
      raise ValueError(
        f'monitor.webhook_url={setting}: the environment variable {name} is not set '
        f'(export {name}=https://... on every host, or leave monitor.webhook_url empty)'
      )
    where = f'${name}'
  elif REDACTED in setting:
    raise ValueError(
      f'monitor.webhook_url={setting} is a redacted URL from a saved config: give the '
      'webhook again, as env:NAME with the URL in $NAME'
    )
  else:
    url, where = setting, 'monitor.webhook_url'
  if not url.startswith(('http://', 'https://')):
    raise ValueError(f'{where} must be an http(s) URL, got {redact(url)!r}')
  return url


def redact(setting: str) -> str:
  """`monitor.webhook_url` as it may be saved: env:NAME as it is, a URL cut to its scheme
  and host (enough to tell which service the alerts went to)."""
  if not setting or setting.startswith(ENV_PREFIX) or REDACTED in setting:
    return setting
  parts = urllib.parse.urlsplit(setting)
  if parts.scheme and parts.hostname:
    return f'{parts.scheme}://{parts.hostname}/{REDACTED}'
  return REDACTED


def redacted_config(config: dict) -> dict:
  """A run config (as a dict) safe to write anywhere: its webhook URL redacted."""
  monitor = config.get('monitor') or {}
  if not monitor.get('webhook_url'):
    return config
  return {**config, 'monitor': {**monitor, 'webhook_url': redact(monitor['webhook_url'])}}


class Webhook:
  """Posts alerts to `url` from a daemon thread; `send` returns at once."""

  def __init__(self, url: str, run_name: str, announce=print):
    self._url = url
    self._run_name = run_name
    self._announce = announce
    self._last_sent = {}  # kind -> time
    self._queue = queue.Queue()
    self._thread = threading.Thread(target=self._deliver, daemon=True, name='k2jax-alerts')
    self._thread.start()

  def send(self, text: str, kind: str = 'info') -> bool:
    """Queues an alert; False if the same kind was sent too recently."""
    now = time.monotonic()
    if kind in self._last_sent and now - self._last_sent[kind] < _REPEAT_SECONDS:
      return False
    self._last_sent[kind] = now
    self._queue.put(f'[k2jax {self._run_name}] {text}')
    return True

  def _deliver(self):
    while True:
      text = self._queue.get()
      if text is None:
        return
      request = urllib.request.Request(
        self._url,
        data=json.dumps({'text': text}).encode(),
        headers={'Content-Type': 'application/json'},
        method='POST',
      )
      try:
        with urllib.request.urlopen(request, timeout=10) as response:
          response.read()
      except OSError as e:  # URLError, timeouts, refused connections
        self._announce(f'warning: alert not delivered to the webhook ({e}): {text}')
      finally:
        self._queue.task_done()

  def close(self, timeout: float = 10.0):
    """Delivers what is queued (up to `timeout` seconds), then stops the thread."""
    self._queue.put(None)
    self._thread.join(timeout)


class StallWatchdog:
  """Calls `on_stall(minutes)` when no `beat()` came for `minutes`; once per stall."""

  def __init__(self, minutes: float, on_stall):
    self._seconds = minutes * 60
    self._on_stall = on_stall
    self._last_beat = time.monotonic()
    self._alerted = False
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True, name='k2jax-watchdog')
    self._thread.start()

  def beat(self):
    self._last_beat = time.monotonic()
    self._alerted = False

  def _watch(self):
    while not self._stop.wait(min(self._seconds / 4, 30.0)):
      silent = time.monotonic() - self._last_beat
      if silent >= self._seconds and not self._alerted:
        self._alerted = True
        self._on_stall(silent / 60)

  def close(self):
    self._stop.set()
    self._thread.join(5.0)
