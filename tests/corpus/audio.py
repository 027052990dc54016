"""Synthetic speech-like audio at 16 kHz for the corpus' audio models.

An utterance is a run of syllables: a voiced vowel (harmonics of a gliding pitch, shaped by
three formant resonances that move from one vowel to the next) with a syllable envelope, often
preceded by a short consonant (a band-limited burst or fricative). Words are separated by short
gaps and phrases by pauses; a quiet room-tone floor runs under everything. All of it is drawn
from a seeded generator, so a seed gives the same samples.
"""

from __future__ import annotations

import numpy as np

SR = 16000

# (F1, F2, F3) in Hz of a few vowels (adult average), the formant targets syllables move between.
VOWELS = (
    (730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
    (660, 1720, 2410), (570, 840, 2410), (440, 1020, 2240), (490, 1350, 1690),
)


def _formant_gain(freqs: np.ndarray, formants: np.ndarray, bandwidth: float = 90.0) -> np.ndarray:
    """Magnitude of a cascade of three resonances at ``freqs`` (per sample, per harmonic)."""
    gain = np.ones_like(freqs)
    for k in range(formants.shape[-1]):
        f = formants[..., k:k + 1]
        bw = bandwidth * (1 + k)
        gain = gain * (f * f) / np.sqrt((f * f - freqs * freqs) ** 2 + (bw * freqs) ** 2 + 1e-9)
    return gain


def _vowel(rng: np.random.Generator, n: int, f0_start: float, f0_end: float,
           v_from: tuple[int, int, int], v_to: tuple[int, int, int]) -> np.ndarray:
    t = np.arange(n) / SR
    vibrato = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 6) * t)
    f0 = np.linspace(f0_start, f0_end, n) * vibrato
    phase = 2 * np.pi * np.cumsum(f0) / SR
    mix = np.linspace(0, 1, n)[:, None]
    formants = (1 - mix) * np.array(v_from, float) + mix * np.array(v_to, float)
    n_harm = int(min(40, 4000 // max(f0_start, f0_end)))
    k = np.arange(1, n_harm + 1)[None, :]
    freqs = f0[:, None] * k
    amps = _formant_gain(freqs, formants) / k  # glottal source falls ~6 dB/octave
    wave = (amps * np.sin(phase[:, None] * k)).sum(axis=1)
    return wave / (np.abs(wave).max() + 1e-9)


def _consonant(rng: np.random.Generator, n: int) -> np.ndarray:
    """A fricative or plosive burst: a little noise, band-limited by a moving average difference."""
    noise = rng.standard_normal(n)
    lo, hi = int(rng.integers(2, 5)), int(rng.integers(8, 20))
    band = np.convolve(noise, np.ones(lo) / lo, "same") - np.convolve(noise, np.ones(hi) / hi, "same")
    env = np.hanning(n) if rng.random() < 0.6 else np.exp(-np.linspace(0, 6, n))
    return band * env / (np.abs(band).max() + 1e-9)


def _envelope(n: int, attack: float = 0.2, release: float = 0.35) -> np.ndarray:
    env = np.ones(n)
    a, r = max(1, int(n * attack)), max(1, int(n * release))
    env[:a] = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, a))
    env[-r:] = 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, r))
    return env


def utterance(rng: np.random.Generator, seconds: float, speech_fraction: float = 0.7) -> np.ndarray:
    """``seconds`` of speech-like audio (float32, peak about 0.5) with pauses between phrases."""
    total = int(seconds * SR)
    out = np.zeros(total)
    pos = int(rng.uniform(0.0, 0.15) * SR)
    f0_base = rng.uniform(95, 230)  # a voice: low male to child-like
    vowel = VOWELS[int(rng.integers(0, len(VOWELS)))]
    while pos < total:
        phrase_end = pos + int(rng.uniform(0.6, 1.8) * SR * speech_fraction / 0.7)
        f0 = f0_base * rng.uniform(1.0, 1.25)
        while pos < min(phrase_end, total):
            for _syllable in range(int(rng.integers(1, 4))):  # a word
                if rng.random() < 0.55:
                    c = int(rng.uniform(0.02, 0.07) * SR)
                    end = min(total, pos + c)
                    out[pos:end] += 0.25 * _consonant(rng, c)[: end - pos]
                    pos = end
                n = int(rng.uniform(0.08, 0.24) * SR)
                nxt = VOWELS[int(rng.integers(0, len(VOWELS)))]
                f_next = f0 * rng.uniform(0.9, 1.05)  # declining intonation
                syl = _vowel(rng, n, f0, f_next, vowel, nxt) * _envelope(n) * rng.uniform(0.5, 1.0)
                end = min(total, pos + n)
                out[pos:end] += syl[: end - pos]
                pos, f0, vowel = end, f_next, nxt
            pos += int(rng.uniform(0.03, 0.12) * SR)  # gap between words
        pos += int(rng.uniform(0.25, 0.7) * SR * (1 - speech_fraction) / 0.3)  # pause
    out = 0.5 * out / (np.abs(out).max() + 1e-9)
    return (out + room_tone(rng, total)).astype(np.float32)


def room_tone(rng: np.random.Generator, n: int, level: float = 0.002) -> np.ndarray:
    """A quiet background: low hum plus a faint noise floor (about -55 dBFS)."""
    t = np.arange(n) / SR
    hum = 0.3 * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * t + rng.uniform(0, 6.28))
    return level * (hum + 0.5 * rng.standard_normal(n))


def silence(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Room tone alone: what a voice-activity model should call non-speech."""
    return room_tone(rng, int(seconds * SR)).astype(np.float32)


def clip_with_silences(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Audio that alternates silence and speech, and a per-sample mask of where speech was put."""
    total = int(seconds * SR)
    audio = silence(rng, seconds)
    mask = np.zeros(total, bool)
    pos = int(rng.uniform(0.2, 0.6) * SR)
    while pos < total:
        n = int(rng.uniform(0.8, 1.8) * SR)
        end = min(total, pos + n)
        audio[pos:end] += utterance(rng, n / SR, speech_fraction=0.9)[: end - pos]
        mask[pos:end] = True
        pos = end + int(rng.uniform(0.4, 1.0) * SR)
    return audio, mask
