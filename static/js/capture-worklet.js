// AudioWorklet processor for the microphone (runs on the audio thread).
//
// In:  whatever the AudioContext gives (usually 48 kHz or 44.1 kHz, 1-2 channels).
// Out: messages to the main thread:
//   {type: "frame", pcm: ArrayBuffer}  Int16 LE mono 16 kHz, exactly `frameSamples`
//                                      samples (1600 = 100 ms), the socket's frame size
//   {type: "level", rms, peak}         input level about every 50 ms, for the meter
//
// Resampling: a windowed-sinc low-pass (cut-off ~7.2 kHz) against aliasing, then
// linear interpolation at the fractional step inRate / 16000. Cheap enough for the
// audio thread (31 multiply-adds per input sample) and plenty for speech recognition.

const TAPS = 31;

function lowPass(inRate, cutoffHz) {
  const fc = cutoffHz / inRate; // cycles per input sample
  const mid = (TAPS - 1) / 2;
  const h = new Float32Array(TAPS);
  let sum = 0;
  for (let i = 0; i < TAPS; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * x) / (Math.PI * x);
    const hamming = 0.54 - 0.46 * Math.cos((2 * Math.PI * i) / (TAPS - 1));
    h[i] = sinc * hamming;
    sum += h[i];
  }
  for (let i = 0; i < TAPS; i++) h[i] /= sum;
  return h;
}

class ParleyCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.targetRate = opts.targetRate || 16000;
    this.frameSamples = opts.frameSamples || 1600;
    this.inRate = sampleRate; // global in AudioWorkletGlobalScope
    this.ratio = this.inRate / this.targetRate;
    this.filter = this.inRate > this.targetRate ? lowPass(this.inRate, this.targetRate * 0.45) : null;
    this.history = new Float32Array(TAPS); // ring of recent input samples for the FIR
    this.historyPos = 0;
    this.t = 0; // position of the next output sample, in input samples, relative to this block
    this.prev = 0; // last filtered sample of the previous block
    this.frame = new Int16Array(this.frameSamples);
    this.frameFill = 0;
    this.levelEvery = Math.round(this.inRate * 0.05);
    this.levelCount = 0;
    this.levelSumSq = 0;
    this.levelPeak = 0;
    this.mono = new Float32Array(128);
    this.filtered = new Float32Array(128);
  }

  downmix(channels) {
    const n = channels[0].length;
    if (this.mono.length < n) {
      this.mono = new Float32Array(n);
      this.filtered = new Float32Array(n);
    }
    const mono = this.mono;
    if (channels.length === 1) {
      mono.set(channels[0]);
    } else {
      const k = 1 / channels.length;
      for (let i = 0; i < n; i++) {
        let s = 0;
        for (let c = 0; c < channels.length; c++) s += channels[c][i];
        mono[i] = s * k;
      }
    }
    return n;
  }

  meter(mono, n) {
    for (let i = 0; i < n; i++) {
      const s = mono[i];
      this.levelSumSq += s * s;
      const a = s < 0 ? -s : s;
      if (a > this.levelPeak) this.levelPeak = a;
    }
    this.levelCount += n;
    if (this.levelCount >= this.levelEvery) {
      this.port.postMessage({
        type: "level",
        rms: Math.sqrt(this.levelSumSq / this.levelCount),
        peak: this.levelPeak,
      });
      this.levelCount = 0;
      this.levelSumSq = 0;
      this.levelPeak = 0;
    }
  }

  lowPassInto(mono, n) {
    const out = this.filtered;
    const h = this.filter;
    if (!h) {
      out.set(mono.subarray(0, n));
      return out;
    }
    const hist = this.history;
    for (let i = 0; i < n; i++) {
      hist[this.historyPos] = mono[i];
      this.historyPos = (this.historyPos + 1) % TAPS;
      let acc = 0;
      let p = this.historyPos; // oldest sample
      for (let k = 0; k < TAPS; k++) {
        acc += hist[p] * h[k];
        p = p + 1 === TAPS ? 0 : p + 1;
      }
      out[i] = acc;
    }
    return out;
  }

  push(sample) {
    const s = sample > 1 ? 1 : sample < -1 ? -1 : sample;
    this.frame[this.frameFill++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    if (this.frameFill === this.frameSamples) {
      const buffer = this.frame.buffer;
      this.port.postMessage({ type: "frame", pcm: buffer }, [buffer]);
      this.frame = new Int16Array(this.frameSamples);
      this.frameFill = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || input[0].length === 0) return true;
    const n = this.downmix(input);
    this.meter(this.mono, n);
    const f = this.lowPassInto(this.mono, n);
    // t is in [-1, n - 1]: -1 means "at the last sample of the previous block".
    let t = this.t;
    while (t <= n - 1) {
      const i = Math.floor(t);
      const frac = t - i;
      const a = i < 0 ? this.prev : f[i];
      const b = i + 1 < n ? f[i + 1] : a;
      this.push(a + (b - a) * frac);
      t += this.ratio;
    }
    this.t = t - n;
    this.prev = f[n - 1];
    return true;
  }
}

registerProcessor("parley-capture", ParleyCaptureProcessor);
