// Gapless playback of the persona's voice: PCM16 LE mono chunks at any sample
// rate, scheduled back to back on one AudioContext, stoppable at once (barge-in).
//
// window.parleyStats.samplesQueued counts every sample handed to Web Audio
// (tests read it to know reply audio was played).

const START_DELAY_S = 0.06; // headroom so the first chunk never starts in the past

export function parleyStats() {
  if (!window.parleyStats) {
    window.parleyStats = { samplesQueued: 0, chunksQueued: 0, framesSent: 0, stops: 0 };
  }
  return window.parleyStats;
}

export class Player {
  /**
   * @param {() => AudioContext} getContext returns the page's (shared) AudioContext
   * @param {{onstart?: () => void, onidle?: () => void}} hooks
   */
  constructor(getContext, hooks = {}) {
    this.getContext = getContext;
    this.hooks = hooks;
    this.sources = new Set();
    this.nextTime = 0;
    this.carry = null; // an odd trailing byte from the previous chunk
    this.stats = parleyStats();
  }

  get playing() {
    return this.sources.size > 0;
  }

  /** Queue PCM16 LE mono bytes (ArrayBuffer or view) at `sampleRate` Hz. */
  enqueue(bytes, sampleRate) {
    let data = new Uint8Array(bytes instanceof ArrayBuffer ? bytes : bytes.buffer);
    if (this.carry !== null) {
      const joined = new Uint8Array(data.length + 1);
      joined[0] = this.carry;
      joined.set(data, 1);
      data = joined;
      this.carry = null;
    }
    if (data.length % 2) {
      this.carry = data[data.length - 1];
      data = data.subarray(0, data.length - 1);
    }
    const count = data.length / 2;
    if (!count) return;
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    const ctx = this.getContext();
    const buffer = ctx.createBuffer(1, count, sampleRate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < count; i++) channel[i] = view.getInt16(i * 2, true) / 32768;

    if (ctx.state === "suspended") ctx.resume().catch(() => {});
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    const startAt = Math.max(this.nextTime, ctx.currentTime + START_DELAY_S);
    source.start(startAt);
    this.nextTime = startAt + buffer.duration;
    const wasIdle = !this.playing;
    this.sources.add(source);
    source.onended = () => {
      this.sources.delete(source);
      if (!this.playing && this.hooks.onidle) this.hooks.onidle();
    };
    this.stats.samplesQueued += count;
    this.stats.chunksQueued += 1;
    if (wasIdle && this.hooks.onstart) this.hooks.onstart();
  }

  /** Silence now and forget everything queued. */
  stop() {
    const had = this.playing;
    for (const source of this.sources) {
      source.onended = null;
      try {
        source.stop();
      } catch {
        // already stopped
      }
      source.disconnect();
    }
    this.sources.clear();
    this.nextTime = 0;
    this.carry = null;
    if (had) {
      this.stats.stops += 1;
      if (this.hooks.onidle) this.hooks.onidle();
    }
  }
}
