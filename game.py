"""The 2D game every stage trains in: rules, batched torch renderer, scene generators, oracle.

A continuous world in the unit square. x grows to the right, y grows downward (screen
coordinates), and a frame's row is y and its column is x: no transpose anywhere.
The agent is a green disc with a red eye; gold pieces are yellow discs; walls are black
rectangles. Everything that steps or draws works on whole batches of games as tensors, on
the CPU or a GPU; scenes are drawn with numpy on the CPU so a seed gives the same scene on
any device.

Turn names follow what the frame shows: heading grows clockwise on screen (y points down),
so action 3 (heading -= pi/30) turns the agent LEFT and action 4 (heading += pi/30) turns it
RIGHT, as seen in the picture. (The original called them clockwise / anticlockwise in the
transposed frame it fed the brain.)

Wall convention, shared by drawing and collision: a wall [x, y, w, h, theta] is the
rectangle with local coordinates 0 <= u <= w, 0 <= v <= h, placed by
    world = (x, y) + u * (cos theta, sin theta) + v * (-sin theta, cos theta),
i.e. rotated by theta about its top-left corner, in the same sense as the heading.
"""

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

# ----------------------------------------------------------------------------- constants

NOOP, FORWARD, BACKWARD, LEFT, RIGHT = 0, 1, 2, 3, 4
ACTION_NAMES = ("noop", "forward", "backward", "left", "right")
TURN = math.pi / 30            # radians per turn action
STEP = 1 / 16                  # longest forward/backward move
STEP_RESOLUTION = 1 / 1024     # moves are shortened at walls in multiples of this (independent of drawing)
AGENT_RADIUS = 0.05
GOLD_RADIUS = 1 / 64
WALL_WIDTH = 50 / 800
INNER_WALL_LENGTH = (300 / 800, 600 / 800)
EXIT_GAP = 0.2                 # width of the gap some side walls have (wider than the agent)
LINE_WIDTH = 0.021             # thickness of the "line to gold" bar
NEAR_DISTANCE = 0.25           # scene_facts: gold closer than this (centre to centre) is "near"
MAX_ACTIONS = 31               # an episode's action limit (oracle traces, RL)
MIN_BARE_OFFSET = 0.075        # random_bare_settings places its gold reliably from this max_agent_offset up:
                               # below, the box leaves little room outside the agent (0.05: 2 seeds in 1000 failed)
ZOOM_RANGE = (2.0, 21.0)       # zoom factors of the image-pretraining mix (log-uniform)
MIN_SIZE = 8
_CHUNK = 2 ** 18

# frame colours, 0..255 per channel, listed bottom to top: a pixel shows its topmost layer
BACKGROUND, WALL_LAYER, LINE_LAYER, GOLD_LAYER, AGENT_LAYER, EYE_LAYER = range(6)
PALETTE = (
    (255, 255, 255),   # background: white
    (0, 0, 0),         # walls: black
    (0, 0, 213),       # line to gold: blue
    (255, 200, 0),     # gold
    (0, 255, 0),       # agent: green
    (255, 0, 0),       # eye: red
)
EYE_OFFSET, EYE_RADIUS = 0.6, 0.4   # eye centre 0.6 r ahead of the agent's centre, radius 0.4 r


# ----------------------------------------------------------------------------- Settings

def _number(value, name, lo=-math.inf, hi=math.inf, lo_open=False):
    """A finite float in [lo, hi] (or (lo, hi] when lo_open), else ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"Settings.{name} must be a number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Settings.{name} must be finite, got {value}")
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise ValueError(f"Settings.{name} must be in {bracket}{lo}, {hi}], got {value}")
    return value


def _tuples(value, name, arity, checks):
    """A list of `arity`-tuples of numbers, each element checked by checks[i](x, field_name)."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"Settings.{name} must be a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, (list, tuple)) or len(item) != arity:
            raise ValueError(f"Settings.{name}[{i}] must be a list of {arity} numbers, got {item!r}")
        out.append(tuple(check(x, f"{name}[{i}][{j}]") for j, (x, check) in enumerate(zip(item, checks))))
    return out


def _unit(x, name):
    return _number(x, name, 0.0, 1.0)


def _size(x, name):
    return _number(x, name, 0.0)


@dataclass
class Settings:
    """One scene as plain data: agent pose, radii, gold centres and walls [x, y, w, h, theta]."""
    agent_x: float
    agent_y: float
    heading: float
    agent_radius: float = AGENT_RADIUS
    gold_radius: float = GOLD_RADIUS
    gold: list = field(default_factory=list)    # [(x, y), ...] centres
    walls: list = field(default_factory=list)   # [(x, y, w, h, theta), ...]; see the module docstring

    def __post_init__(self):
        self.agent_x = _unit(self.agent_x, "agent_x")
        self.agent_y = _unit(self.agent_y, "agent_y")
        self.heading = _number(self.heading, "heading", 0.0, 2 * math.pi)
        if self.heading == 2 * math.pi:
            raise ValueError("Settings.heading must be in [0, 2*pi), got 2*pi")
        self.agent_radius = _number(self.agent_radius, "agent_radius", 0.0, 1.0, lo_open=True)
        self.gold_radius = _number(self.gold_radius, "gold_radius", 0.0, 1.0, lo_open=True)
        self.gold = _tuples(self.gold, "gold", 2, (_unit, _unit))
        self.walls = _tuples(self.walls, "walls", 5, (_unit, _unit, _size, _size, _number))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text) -> "Settings":
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"Settings JSON is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"Settings JSON must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Settings JSON has unknown field(s): {', '.join(unknown)}")
        missing = sorted(n for n in ("agent_x", "agent_y", "heading") if n not in data)
        if missing:
            raise ValueError(f"Settings JSON lacks field(s): {', '.join(missing)}")
        return cls(**data)


# ----------------------------------------------------------------------------- geometry (torch)

def _wall_offsets(points, walls):
    """points (B, N, 2), walls (B, W, 5) -> (du, dv) (B, N, W): the offset from each wall's nearest
    point to each point, in the wall's own frame (zero inside the wall), and the walls' cos, sin (B, 1, W)."""
    x, y, w, h, theta = (t[:, None, :] for t in walls.unbind(-1))
    c, s = torch.cos(theta), torch.sin(theta)
    dx, dy = points[..., 0:1] - x, points[..., 1:2] - y
    u, v = dx * c + dy * s, -dx * s + dy * c           # the point in the wall's own frame
    du = u - torch.minimum(torch.clamp(u, min=0), w)
    dv = v - torch.minimum(torch.clamp(v, min=0), h)
    return du, dv, c, s


def _circle_hits_walls(points, radius, walls, wall_mask):
    """points (B, N, 2), radius (B,), walls (B, W, 5), wall_mask (B, W) -> (B, N) bool:
    the open disc of `radius` at each point overlaps a (closed) wall rectangle."""
    du, dv, _, _ = _wall_offsets(points, walls)
    return ((du * du + dv * dv < radius[:, None, None] ** 2) & wall_mask[:, None, :]).any(-1)


def _wrap_angle(a):
    """Angles to [0, 2pi); the second line catches remainder() rounding up to exactly 2pi."""
    a = torch.remainder(a, 2 * math.pi)
    return torch.where(a >= 2 * math.pi, a - 2 * math.pi, a)


def _bearing(pos, heading, target, half_width):
    """Where `target` (B, 2) lies for an agent at pos (B, 2) facing heading (B,).
    Returns dx, dy, distance, angle (signed, heading -> target, + is clockwise on screen =
    a RIGHT turn), ahead / behind (in front of / behind it, less than half_width (B,) off its line of motion)."""
    d = target - pos
    fx, fy = torch.cos(heading), torch.sin(heading)
    along = d[:, 0] * fx + d[:, 1] * fy
    across = fx * d[:, 1] - fy * d[:, 0]
    angle = torch.atan2(across, along)
    # within the width, or as close as a turn can bring it (far gold can't get closer than TURN/2)
    in_line = across.abs() < half_width
    ahead = (along > 0) & (in_line | (angle.abs() <= TURN / 2))
    behind = (along < 0) & (in_line | (math.pi - angle.abs() <= TURN / 2))
    return dict(dx=d[:, 0], dy=d[:, 1], distance=d.norm(dim=-1), angle=angle, ahead=ahead, behind=behind)


# ----------------------------------------------------------------------------- renderer (torch)
# A scanline rasterizer. Every shape is convex, so it covers one span of columns per row.
# Each row gets "events" (span starts and ends) that add or remove the shape's layer in a
# per-pixel counter; after sorting a row's events, the counter gives the topmost layer (hence
# the colour) after each event, and the colour *change* at each event is written into a
# difference image. A prefix sum along the row then fills every pixel at once. Per-pixel work
# is a few passes, independent of the number of shapes; per-shape work is per row.

def _slab(coef, k, size):
    """The x-range where 0 <= coef * x + k <= size, as (lo, hi); empty ranges have lo > hi."""
    flat = coef.abs() < 1e-12
    safe = torch.where(flat, torch.ones_like(coef), coef)
    a, b = -k / safe, (size - k) / safe
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    inside = (k >= 0) & (k <= size)                    # a flat constraint holds for all x or none
    lo = torch.where(flat, torch.where(inside, -math.inf, math.inf), lo)
    hi = torch.where(flat, torch.where(inside, math.inf, -math.inf), hi)
    return lo, hi


def _rect_rows(rects, ys):
    """rects (B, K, 5), ys (B, S) row centres -> x-range (lo, hi) of each rectangle on each row, (B, S, K)."""
    x, y, w, h, theta = (t[:, None, :, None] for t in rects.unbind(-1))
    c, s = torch.cos(theta), torch.sin(theta)
    dy = ys[:, :, None, None] - y
    # 0 <= u <= w and 0 <= v <= h with u = c x + (dy s - x0 c), v = -s x + (dy c + x0 s), both at once
    lo, hi = _slab(torch.cat([c, -s], -1), torch.cat([dy * s - x * c, dy * c + x * s], -1), torch.cat([w, h], -1))
    return lo.amax(-1), hi.amin(-1)


def _circle_rows(circles, ys):
    """circles (B, K, 3) [cx, cy, r], ys (B, S) -> open x-range of each disc on each row, (B, S, K)."""
    cx, cy, r = (t[:, None, :] for t in circles.unbind(-1))
    half2 = r * r - (ys[:, :, None] - cy) ** 2
    half = torch.sqrt(torch.clamp(half2, min=0))
    return (torch.where(half2 > 0, cx - half, math.inf), torch.where(half2 > 0, cx + half, -math.inf))


def _columns(lo, hi, x0, scale, size, closed):
    """World x-range -> half-open column range [start, stop) of the pixels whose centres lie in it."""
    a = (lo - x0) * scale - 0.5                        # pixel j's centre is at x0 + (j + 0.5) / scale
    b = (hi - x0) * scale - 0.5
    start, stop = (torch.ceil(a), torch.floor(b) + 1) if closed else (torch.floor(a) + 1, torch.ceil(b))
    return start.clamp(0, size).long(), stop.clamp(0, size).long()


def _fill_rows(start, stop, units, thresholds, size):
    """Spans [start, stop) (B, S, K) with per-shape layer units (B, 1, K) -> frames (B, 3, S, size) uint8."""
    B, S, K = start.shape
    units = torch.where(start < stop, units, 0)
    zero = torch.zeros_like(start[..., :1])
    pos, order = torch.cat([zero, start, stop], -1).sort(-1)   # a zero event at column 0 paints the background
    count = torch.cat([zero, units, -units], -1).gather(-1, order).cumsum(-1)   # packed layer counters
    top = torch.bucketize(count, thresholds, right=True)       # topmost layer present after each event
    palette = _PALETTE.to(start.device)
    after = palette.index_select(0, top.flatten()).view(B, S, -1, 3).permute(0, 3, 1, 2)
    change = torch.diff(after, dim=-1, prepend=torch.zeros_like(after[..., :1])).contiguous()
    # uint8 arithmetic wraps modulo 256, and the prefix sums of the changes are colours in 0..255
    # one extra column catches the events past the row's end
    frame = torch.zeros(B, 3, S, size + 1, dtype=torch.uint8, device=start.device)
    frame.scatter_add_(3, pos[:, None].expand(B, 3, S, -1).contiguous(), change)
    return frame.cumsum_(-1)[..., :size]


_PALETTE = torch.tensor(PALETTE, dtype=torch.uint8)


def _check_size(size):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"render size must be an integer >= {MIN_SIZE}, got {size!r}")
    return int(size)


# ----------------------------------------------------------------------------- GameBatch

class GameBatch:
    """B games stepped and drawn together. State lives in padded float64 tensors on `device`:
    walls (B, W, 5) and gold (B, G, 2) with boolean masks for the real entries."""

    def __init__(self, settings_list, device="cpu"):
        settings_list = list(settings_list)
        if not settings_list or not all(isinstance(s, Settings) for s in settings_list):
            raise ValueError("GameBatch needs a non-empty list of Settings")
        self.device = torch.device(device)
        f64 = dict(dtype=torch.float64, device=self.device)
        B = len(settings_list)
        W = max(1, max(len(s.walls) for s in settings_list))
        G = max(1, max(len(s.gold) for s in settings_list))
        walls, wall_mask = np.zeros((B, W, 5)), np.zeros((B, W), bool)
        gold, gold_mask = np.zeros((B, G, 2)), np.zeros((B, G), bool)
        for b, s in enumerate(settings_list):
            walls[b, :len(s.walls)], wall_mask[b, :len(s.walls)] = np.reshape(s.walls, (-1, 5)), True
            gold[b, :len(s.gold)], gold_mask[b, :len(s.gold)] = np.reshape(s.gold, (-1, 2)), True
        self.pos = torch.tensor([(s.agent_x, s.agent_y) for s in settings_list], **f64)
        self.heading = torch.tensor([s.heading for s in settings_list], **f64)
        self.agent_radius = torch.tensor([s.agent_radius for s in settings_list], **f64)
        self.gold_radius = torch.tensor([s.gold_radius for s in settings_list], **f64)
        self.walls = torch.tensor(walls, **f64)
        self.wall_mask = torch.tensor(wall_mask, device=self.device)
        self.gold = torch.tensor(gold, **f64)
        self.gold_mask = torch.tensor(gold_mask, device=self.device)
        self._lengths = torch.arange(1, round(STEP / STEP_RESOLUTION) + 1, **f64) * STEP_RESOLUTION
        self._turn = torch.tensor([0, 0, 0, -TURN, TURN], **f64)      # heading change per action
        self._sign = torch.tensor([0, 1, -1, 0, 0], **f64)            # move direction per action

    def __len__(self):
        return self.pos.shape[0]

    # --- rules

    def step(self, actions) -> torch.Tensor:
        """Apply one action per game; returns the number of gold pieces each action collected."""
        a = self._actions(actions)
        self.heading = torch.where(self._turn[a] != 0, _wrap_angle(self.heading + self._turn[a]), self.heading)
        self._move(self._sign[a])
        return self._collect()

    def _actions(self, actions):
        a = torch.as_tensor(actions, device=self.device)
        if a.dtype.is_floating_point or a.dtype.is_complex or a.dtype == torch.bool:
            raise ValueError(f"actions must be integer ids 0..4, got dtype {a.dtype}")
        if a.shape != (len(self),):
            raise ValueError(f"expected {len(self)} actions, got shape {tuple(a.shape)}")
        bad = (a < 0) | (a >= len(ACTION_NAMES))
        if bad.any():
            raise ValueError(f"unknown action id(s) {sorted(set(a[bad].tolist()))}; valid: 0..4 {ACTION_NAMES}")
        return a.long()

    def _reach(self, sign, n_candidates=None):
        """Candidate positions STEP_RESOLUTION apart along the heading (sign +1 / -1), (B, K, 2), and
        how many of them, from the nearest on, stay off walls and on the board (B,): never jump a wall."""
        lengths = self._lengths[:n_candidates]
        direction = torch.stack([torch.cos(self.heading), torch.sin(self.heading)], -1) * sign[:, None]
        candidates = self.pos[:, None, :] + lengths[None, :, None] * direction[:, None, :]
        on_board = ((candidates >= 0) & (candidates <= 1)).all(-1)
        free = on_board & ~_circle_hits_walls(candidates, self.agent_radius, self.walls, self.wall_mask)
        return candidates, free.long().cumprod(1).sum(1)

    def _move(self, sign):
        """Move by up to STEP along the heading, shortened to the longest free candidate (sign 0 stays)."""
        candidates, n = self._reach(sign)
        chosen = candidates[torch.arange(len(self), device=self.device), (n - 1).clamp(min=0)]
        self.pos = torch.where(((n > 0) & (sign != 0))[:, None], chosen, self.pos)

    def _collect(self):
        d2 = ((self.gold - self.pos[:, None, :]) ** 2).sum(-1)
        touching = d2 < ((self.agent_radius + self.gold_radius) ** 2)[:, None]
        got = touching & self.gold_mask
        self.gold_mask = self.gold_mask & ~got
        return got.sum(1)

    def gold_left(self) -> torch.Tensor:
        return self.gold_mask.sum(1)

    def to_settings(self) -> list:
        pos, heading = self.pos.tolist(), self.heading.tolist()
        walls, wall_mask = self.walls.tolist(), self.wall_mask.tolist()
        gold, gold_mask = self.gold.tolist(), self.gold_mask.tolist()
        ra, rg = self.agent_radius.tolist(), self.gold_radius.tolist()
        return [Settings(pos[b][0], pos[b][1], heading[b], ra[b], rg[b],
                         [tuple(g) for g, m in zip(gold[b], gold_mask[b]) if m],
                         [tuple(w) for w, m in zip(walls[b], wall_mask[b]) if m])
                for b in range(len(self))]

    # --- the oracle

    def _target(self):
        """The first remaining gold piece of each game (B, 2) and whether there is one (B,)."""
        first = self.gold_mask.long().argmax(1)
        return self.gold[torch.arange(len(self), device=self.device), first], self.gold_mask.any(1)

    def _aim(self):
        """The point the oracle heads for: the first remaining gold piece, pushed out of every
        wall's reach (agent radius plus a small margin) so that the agent's centre can get there.
        Near a wall this makes the agent slide along the wall instead of pushing into it."""
        aim = self._target()[0]
        reach = self.agent_radius + 2 * STEP_RESOLUTION   # more than a shortened step leaves between agent and wall
        for k in range(self.walls.shape[1]):               # one wall at a time, so corners push twice
            du, dv, c, s = (t[:, 0, 0] for t in _wall_offsets(aim[:, None, :], self.walls[:, k:k + 1]))
            dist = torch.sqrt(du * du + dv * dv)
            push = self.wall_mask[:, k] & (dist > 0) & (dist < reach)   # (dist 0: inside the wall, unreachable)
            scale = torch.where(push, reach / dist.clamp(min=1e-12) - 1, 0)
            aim = aim + scale[:, None] * torch.stack([du * c - dv * s, du * s + dv * c], -1)
        return aim

    def bearing(self):
        """_bearing() of each game's first remaining gold piece (meaningless where none is left)."""
        return _bearing(self.pos, self.heading, self._target()[0], self.agent_radius)

    def oracle_actions(self, backward=False) -> torch.Tensor:
        """Turn the shorter way until the gold is ahead within the agent's width, then go forward.
        With backward=True, face it with the nearer end (front or back) and reverse when that is the back.
        It heads for the reachable point nearest the gold (see _aim) and turns, rather than push, when
        a wall blocks the move. NOOP where no gold is left."""
        target, has_gold = self._target()
        aim = self._aim()
        # the path must pass the aim closer than the agent's width minus the aim's offset from the gold
        half_width = (self.agent_radius - (aim - target).norm(dim=-1)).clamp(min=STEP_RESOLUTION)
        b = _bearing(self.pos, self.heading, aim, half_width)
        ones = torch.ones(len(self), dtype=torch.float64, device=self.device)
        go = b["ahead"] & (self._reach(ones, 1)[1] > 0)          # a wall right in front: turn instead
        toward = lambda angle: torch.where(angle < 0, LEFT, RIGHT)     # angle < 0: heading must shrink
        act = torch.where(go, FORWARD, toward(b["angle"]))
        if backward:
            back_angle = b["angle"] - math.pi * torch.sign(b["angle"])  # bearing seen from the back
            reverse = torch.where(b["behind"] & (self._reach(-ones, 1)[1] > 0), BACKWARD, toward(back_angle))
            act = torch.where(go | (b["angle"].abs() <= math.pi / 2), act, reverse)
        return torch.where(has_gold, act, NOOP)

    # --- drawing

    def render(self, size, zoom=None, centers=None, line=False) -> torch.Tensor:
        """Frames (B, 3, size, size), float in [0, 1]. zoom (float or (B,)) and centers ((B, 2))
        draw only the window [c - 0.5/zoom, c + 0.5/zoom]. line=True adds the blue bar to the gold."""
        size, B = _check_size(size), len(self)
        f64 = dict(dtype=torch.float64, device=self.device)
        zoom = torch.ones(B, **f64) if zoom is None else torch.as_tensor(zoom, **f64).expand(B).clone()
        if not torch.isfinite(zoom).all() or (zoom < 1).any():
            raise ValueError(f"zoom factors must be finite and >= 1, got {zoom.min().item()}")
        centers = torch.full((B, 2), 0.5, **f64) if centers is None else torch.as_tensor(centers, **f64)
        if centers.shape != (B, 2):
            raise ValueError(f"centers must have shape ({B}, 2), got {tuple(centers.shape)}")
        rects, rect_units, circles, circle_units, thresholds = self._shapes(line)
        out = torch.empty(B, 3, size, size, device=self.device)
        chunk = max(1, (_CHUNK if self.device.type == "cpu" else 2 ** 25) // (size * size))
        for i in range(0, B, chunk):                   # bounded memory; chunks stay in cache on a CPU
            part = slice(i, i + chunk)
            scale = (size * zoom[part])[:, None, None]             # pixels per world unit
            x0 = (centers[part, 0] - 0.5 / zoom[part])[:, None, None]
            ys = (centers[part, 1] - 0.5 / zoom[part])[:, None] + (torch.arange(size, **f64) + 0.5) / scale[:, :, 0]
            r_start, r_stop = _columns(*_rect_rows(rects[part], ys), x0, scale, size, closed=True)
            c_start, c_stop = _columns(*_circle_rows(circles[part], ys), x0, scale, size, closed=False)
            units = torch.cat([rect_units[part], circle_units[part]], -1)[:, None, :]
            frame = _fill_rows(torch.cat([r_start, c_start], -1), torch.cat([r_stop, c_stop], -1),
                               units, thresholds, size)
            out[part].copy_(frame).div_(255)
        return out

    def _shapes(self, line):
        """What to draw: rectangles (B, R, 5) and discs (B, C, 3) [x, y, r], each with the unit it
        adds to a packed per-pixel layer counter (0 where absent), and each layer's first unit.
        Every layer gets a bit field wide enough to count all its shapes, higher layers in higher
        bits, so a counter at least a layer's first unit means that layer or a higher one is there."""
        ra, present = self.agent_radius[:, None], torch.ones(len(self), 1, dtype=torch.bool, device=self.device)
        forward = torch.stack([torch.cos(self.heading), torch.sin(self.heading)], -1)
        agent = torch.cat([self.pos, ra], -1)[:, None]
        eye = torch.cat([self.pos + EYE_OFFSET * ra * forward, EYE_RADIUS * ra], -1)[:, None]
        gold = torch.cat([self.gold, self.gold_radius[:, None, None].expand(-1, self.gold.shape[1], 1)], -1)
        rects = [(self.walls, self.wall_mask, WALL_LAYER)]
        if line:
            bar, ok = self._line_bar()
            rects.append((bar[:, None], ok[:, None], LINE_LAYER))
        discs = [(gold, self.gold_mask, GOLD_LAYER), (agent, present, AGENT_LAYER), (eye, present, EYE_LAYER)]
        bits = {layer: 1 for layer in range(1, len(PALETTE))}
        for shapes, _, layer in rects + discs:
            bits[layer] = shapes.shape[1].bit_length()
        first = {layer: sum(bits[l] for l in range(1, layer)) for layer in bits}
        assert sum(bits.values()) < 63, "too many shapes to pack into one int64 counter"
        units = lambda group: torch.cat([mask.long() << first[layer] for _, mask, layer in group], 1)
        thresholds = torch.tensor([1 << first[layer] for layer in sorted(bits)], device=self.device)
        return (torch.cat([r for r, _, _ in rects], 1), units(rects),
                torch.cat([d for d, _, _ in discs], 1), units(discs), thresholds)

    def _bar_axis(self):
        """The line target's bar: where it starts on the agent's rim, its unit direction to the first remaining
        gold piece, its length to that piece's rim, and whether there is one (a piece left, not touching)."""
        target, has = self._target()
        d = target - self.pos
        dist = d.norm(dim=-1)
        u = d / dist.clamp(min=1e-12)[:, None]
        length = dist - self.agent_radius - self.gold_radius
        return self.pos + self.agent_radius[:, None] * u, u, length, has & (length > 0)

    def line_ends(self):
        """The two ends of the line target's bar (B, 2, 2), the agent's rim first, and (B,) whether there is one."""
        start, u, length, has = self._bar_axis()
        return torch.stack([start, start + length[:, None] * u], 1), has

    def _line_bar(self):
        """The blue bar from the agent's rim to its first remaining gold piece's rim, as a wall-like rectangle."""
        start, u, length, has = self._bar_axis()
        corner = start - (LINE_WIDTH / 2) * torch.stack([-u[:, 1], u[:, 0]], -1)
        bar = torch.cat([corner, length[:, None], torch.full_like(length, LINE_WIDTH)[:, None],
                         torch.atan2(u[:, 1], u[:, 0])[:, None]], -1)
        return bar, has


# ----------------------------------------------------------------------------- Game

class Game:
    """One game: a GameBatch of one, so the two always agree exactly."""

    def __init__(self, settings, device="cpu"):
        self.batch = GameBatch([settings], device)

    @property
    def settings(self) -> Settings:
        return self.batch.to_settings()[0]

    def step(self, action) -> int:
        if isinstance(action, bool) or not isinstance(action, (int, np.integer)):
            raise ValueError(f"unknown action {action!r}; valid ids are 0..4 {ACTION_NAMES}")
        return int(self.batch.step([int(action)])[0])

    def render(self, size, zoom=1.0, center=None) -> torch.Tensor:
        return self.batch.render(size, zoom, None if center is None else [center])[0]


def render(settings_list, size, device="cpu", zoom=None, centers=None) -> torch.Tensor:
    """Frames (B, 3, size, size) of a list of Settings."""
    return GameBatch(settings_list, device).render(size, zoom, centers)


def line_target(settings_list, size, device="cpu") -> torch.Tensor:
    """The frames with a blue bar from the agent's rim to the (first) gold's rim: the line trick's target."""
    return GameBatch(settings_list, device).render(size, line=True)


def line_task(settings_list, size, device="cpu"):
    """The line trick's data from one GameBatch: the frames, their line targets (line_target), and where each
    target's bar begins and ends, exactly: (B, 2, 2) float32 points in board units (x right, y down), the
    agent's rim first, then the gold's; with (B,) bool, whether the target has a bar."""
    env = GameBatch(settings_list, device)
    ends, has = env.line_ends()
    return env.render(size), env.render(size, line=True), ends.float(), has


# ----------------------------------------------------------------------------- scene generators (numpy, CPU)

def _rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _side_walls(rng):
    """Four border walls; with probability 0.5 one of them has an exit gap."""
    t = WALL_WIDTH
    sides = [(0, 0, 1, t, 0.0), (0, 1 - t, 1, t, 0.0), (0, 0, t, 1, 0.0), (1 - t, 0, t, 1, 0.0)]
    gap_side = rng.integers(4) if rng.random() < 0.5 else None
    start = rng.uniform(t, 1 - t - EXIT_GAP)
    walls = []
    for i, (x, y, w, h, th) in enumerate(sides):
        if i != gap_side:
            walls.append((x, y, w, h, th))
        elif w == 1:   # horizontal wall: split along x
            walls += [(0, y, start, t, 0.0), (start + EXIT_GAP, y, 1 - start - EXIT_GAP, t, 0.0)]
        else:
            walls += [(x, 0, t, start, 0.0), (x, start + EXIT_GAP, t, 1 - start - EXIT_GAP, 0.0)]
    return [tuple(float(v) for v in w) for w in walls]


def _inner_wall(rng, right_angles, max_tries=1000):
    """A wall of random length and angle whose centre is in the middle of the board."""
    for _ in range(max_tries):
        length = rng.uniform(*INNER_WALL_LENGTH)
        theta = float(rng.choice([0.0, math.pi / 2])) if right_angles else rng.uniform(0, 2 * math.pi)
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        c, s = math.cos(theta), math.sin(theta)
        x = cx - (length / 2) * c + (WALL_WIDTH / 2) * s   # corner = centre - R(theta) (length/2, width/2)
        y = cy - (length / 2) * s - (WALL_WIDTH / 2) * c
        if 0 <= x <= 1 and 0 <= y <= 1:
            return (float(x), float(y), float(length), WALL_WIDTH, float(theta))
    raise ValueError("could not place an inner wall")


def _free(points, radius, walls, discs=()):
    """Which candidate centres (N, 2) give a disc off every wall, on the board, and clear of
    the given discs [(x, y, r)]; uses the same wall test as the game's physics."""
    pts = torch.as_tensor(points, dtype=torch.float64)
    w = torch.tensor(walls, dtype=torch.float64).reshape(1, -1, 5)
    hits = _circle_hits_walls(pts[None], torch.tensor([radius], dtype=torch.float64), w,
                              torch.ones(w.shape[:2], dtype=torch.bool))[0]
    ok = ~hits & (pts >= radius).all(-1) & (pts <= 1 - radius).all(-1)
    for x, y, r in discs:
        ok &= ((pts - torch.tensor([x, y], dtype=torch.float64)) ** 2).sum(-1) >= (radius + r) ** 2
    return ok.numpy()


def _free_spot(rng, radius, walls, discs=(), tries=1000, batch=64):
    """A uniformly drawn free centre for a disc; ValueError after `tries` candidates."""
    for _ in range(0, tries, batch):
        pts = rng.uniform(radius, 1 - radius, size=(batch, 2))
        ok = _free(pts, radius, walls, discs)
        if ok.any():
            return tuple(float(v) for v in pts[ok.argmax()])
    raise ValueError(f"no free spot for a disc of radius {radius} after {tries} tries")


def random_settings(rng, n_inner_walls=(1, 2), n_gold=(1, 2), right_angles=False) -> Settings:
    """A full scene: side walls, n_inner_walls (inclusive range) inner walls at any angle
    (or 0 / pi/2 only), n_gold gold pieces and the agent at free spots, random heading."""
    rng = _rng(rng)
    walls = _side_walls(rng)
    walls += [_inner_wall(rng, right_angles) for _ in range(rng.integers(n_inner_walls[0], n_inner_walls[1] + 1))]
    gold = []
    for _ in range(rng.integers(n_gold[0], n_gold[1] + 1)):
        gold.append(_free_spot(rng, GOLD_RADIUS, walls))
    agent = _free_spot(rng, AGENT_RADIUS, walls, [(x, y, GOLD_RADIUS) for x, y in gold])
    return Settings(agent[0], agent[1], float(rng.uniform(0, 2 * math.pi)), gold=gold, walls=walls)


def random_bare_settings(rng, max_agent_offset=0.3, max_tries=1000, max_heading_error=None) -> Settings:
    """Side walls only and exactly one gold piece, drawn uniformly from the part of the board
    within a box of half-width max_agent_offset around the agent, never touching the agent. The heading is
    uniform, or with max_heading_error (radians) within that much of the direction to the gold (the same draws
    as without it, then one more)."""
    rng = _rng(rng)
    if not (isinstance(max_agent_offset, (int, float)) and max_agent_offset > 0):
        raise ValueError(f"max_agent_offset must be a positive number, got {max_agent_offset!r}")
    if max_heading_error is not None and not 0 <= max_heading_error <= math.pi:
        raise ValueError(f"max_heading_error must be in [0, pi] radians, got {max_heading_error!r}")
    walls = _side_walls(rng)
    heading = float(rng.uniform(0, 2 * math.pi))
    agents = rng.uniform(AGENT_RADIUS, 1 - AGENT_RADIUS, size=(max_tries, 2))
    lo = np.clip(agents - max_agent_offset, GOLD_RADIUS, 1 - GOLD_RADIUS)
    hi = np.clip(agents + max_agent_offset, GOLD_RADIUS, 1 - GOLD_RADIUS)
    golds = lo + rng.random((max_tries, 2)) * (hi - lo)
    w = torch.tensor(walls, dtype=torch.float64).reshape(1, -1, 5).expand(2, -1, -1)
    radii = torch.tensor([AGENT_RADIUS, GOLD_RADIUS], dtype=torch.float64)
    for i in range(0, max_tries, 32):     # the first fitting pair; tested 32 at a time, as most pairs fit
        a, g = agents[i:i + 32], golds[i:i + 32]
        hits = _circle_hits_walls(torch.from_numpy(np.stack([a, g])), radii, w, torch.ones(w.shape[:2], dtype=torch.bool))
        ok = ~hits.any(0).numpy() & (((a - g) ** 2).sum(-1) >= (AGENT_RADIUS + GOLD_RADIUS) ** 2)
        for p, r in ((a, AGENT_RADIUS), (g, GOLD_RADIUS)):            # on the board, as _free tests
            ok &= (p >= r).all(-1) & (p <= 1 - r).all(-1)
        if ok.any():
            i += int(ok.argmax())
            break
    else:
        raise ValueError(f"random_bare_settings: could not place the gold within {max_agent_offset} "
                         f"of the agent without touching it in {max_tries} tries")
    if max_heading_error is not None:
        toward = math.atan2(golds[i, 1] - agents[i, 1], golds[i, 0] - agents[i, 0])
        heading = (toward + float(rng.uniform(-max_heading_error, max_heading_error))) % (2 * math.pi)
        heading = 0.0 if heading >= 2 * math.pi else heading      # % rounds a tiny negative angle up to 2*pi
    return Settings(float(agents[i, 0]), float(agents[i, 1]), heading,
                    gold=[(float(golds[i, 0]), float(golds[i, 1]))], walls=walls)


def random_bare_scenes(rng, n, **kwargs) -> list:
    """n scenes of random_bare_settings(rng, **kwargs), drawn one after another."""
    return [random_bare_settings(rng, **kwargs) for _ in range(n)]


def _jitter_many(settings_list, rng, n_actions=(1, 3), max_repeat=30, device="cpu"):
    """jitter() for a list of scenes, stepped together as one batch."""
    rng = _rng(rng)
    plans = []
    for _ in settings_list:
        k = rng.integers(n_actions[0], n_actions[1] + 1)
        acts, reps = rng.integers(FORWARD, RIGHT + 1, size=k), rng.integers(1, max_repeat + 1, size=k)
        plans.append(np.repeat(acts, reps))
    T = max(len(p) for p in plans)
    table = np.zeros((len(plans), T), dtype=np.int64)      # NOOP pads the shorter plans
    for b, p in enumerate(plans):
        table[b, :len(p)] = p
    batch = GameBatch(settings_list, device)
    for t in range(T):
        batch.step(torch.from_numpy(table[:, t]).to(batch.device))
    return batch.to_settings()


def jitter(settings, rng, n_actions=(1, 3), max_repeat=30) -> Settings:
    """The scene after a few random moves/turns, each repeated 1..max_repeat times (really executed)."""
    return _jitter_many([settings], rng, n_actions, max_repeat)[0]


def zoom_centers(settings) -> list:
    """Points worth magnifying: gold centres, the agent, and wall corners that lie on the board."""
    points = list(settings.gold) + [(settings.agent_x, settings.agent_y)]
    for x, y, w, h, th in settings.walls:
        c, s = math.cos(th), math.sin(th)
        for u, v in ((0, 0), (w, 0), (0, h), (w, h)):
            px, py = x + u * c - v * s, y + u * s + v * c
            if 0 <= px <= 1 and 0 <= py <= 1:
                points.append((px, py))
    return points


def pretrain_scenes(n, rng):
    """What pretrain_image_batch draws: n scenes (a third as drawn, a third jittered, the rest to
    zoom into), zoom factors (n,) and zoom centres (n, 2). Zooms are log-uniform in ZOOM_RANGE,
    around gold, the agent, a wall corner or (1 in 4) a random point."""
    rng = _rng(rng)
    n_full = n_jitter = n // 3
    scenes = [random_settings(rng) for _ in range(n)]
    if n_jitter:
        scenes[n_full:n_full + n_jitter] = _jitter_many(scenes[n_full:n_full + n_jitter], rng)
    zoom, centers = np.ones(n), np.full((n, 2), 0.5)
    for i in range(n_full + n_jitter, n):
        zoom[i] = math.exp(rng.uniform(math.log(ZOOM_RANGE[0]), math.log(ZOOM_RANGE[1])))
        points = zoom_centers(scenes[i])
        centers[i] = rng.random(2) if rng.random() < 0.25 else points[rng.integers(len(points))]
    return scenes, zoom, centers


def pretrain_image_batch(n, size, rng, device="cpu") -> torch.Tensor:
    """The image-pretraining mix (see pretrain_scenes) drawn as (n, 3, size, size); zooms draw only their window."""
    return render_pretrain_scenes(pretrain_scenes(n, rng), size, device)


def render_pretrain_scenes(drawn, size, device="cpu") -> torch.Tensor:
    """pretrain_scenes' (scenes, zooms, centres), drawn elsewhere (e.g. in a data worker), rendered on device."""
    scenes, zoom, centers = drawn
    return render(scenes, size, device, torch.from_numpy(zoom), torch.from_numpy(centers))


# ----------------------------------------------------------------------------- scene facts and the oracle

def scene_facts(settings, gold_index=0) -> dict:
    """What the QA tutorial asks about one gold piece, in screen terms (x right, y down).
    gold_left / gold_above: the gold is left of / above the agent (dx < 0 / dy < 0).
    gold_ahead / gold_behind: within the agent's width in front of / behind it (the oracle's test).
    turn: LEFT or RIGHT, whichever faces the gold sooner (RIGHT when it is exactly behind)."""
    if not 0 <= gold_index < len(settings.gold):
        raise ValueError(f"scene has {len(settings.gold)} gold piece(s); no index {gold_index}")
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    b = _bearing(t([settings.agent_x, settings.agent_y]), t(settings.heading),
                 t(list(settings.gold[gold_index])), t(settings.agent_radius))
    b = {k: v.item() for k, v in b.items()}
    return dict(dx=b["dx"], dy=b["dy"], gold_left=b["dx"] < 0, gold_above=b["dy"] < 0,
                gold_ahead=b["ahead"], gold_behind=b["behind"], turn=LEFT if b["angle"] < 0 else RIGHT,
                angle=b["angle"], distance=b["distance"], near=b["distance"] < NEAR_DISTANCE)


def oracle_action(settings, backward=False) -> int:
    """The oracle's next action for one scene (see GameBatch.oracle_actions)."""
    return int(GameBatch([settings]).oracle_actions(backward)[0])


@dataclass
class Trace:
    """An episode: states[i] is what the agent saw before actions[i]; states has one more entry."""
    states: list
    actions: list
    rewards: list

    @property
    def success(self) -> bool:
        return sum(self.rewards) > 0


def oracle_traces(settings_list, max_actions=MAX_ACTIONS, backward=False, device="cpu") -> list:
    """Oracle episodes for many scenes at once; each stops at its first reward or after max_actions."""
    batch = GameBatch(settings_list, device)
    traces = [Trace([s], [], []) for s in settings_list]
    running = torch.ones(len(batch), dtype=torch.bool, device=batch.device)
    for _ in range(max_actions):
        actions = torch.where(running, batch.oracle_actions(backward), NOOP)
        rewards = batch.step(actions)
        states, action_list, reward_list = batch.to_settings(), actions.tolist(), rewards.tolist()
        for b in running.nonzero()[:, 0].tolist():
            traces[b].actions.append(action_list[b])
            traces[b].rewards.append(reward_list[b])
            traces[b].states.append(states[b])
        running &= (rewards == 0) & (batch.gold_left() > 0)
        if not running.any():
            break
    return traces


def oracle_trace(settings, max_actions=MAX_ACTIONS, backward=False) -> Trace:
    return oracle_traces([settings], max_actions, backward)[0]


def action_values(settings_list, actions=(FORWARD, LEFT, RIGHT), max_actions=MAX_ACTIONS, backward=False,
                  device="cpu") -> torch.Tensor:
    """The oracle's action values: for each scene and each of `actions`, the actions it takes to collect a gold
    piece when that action comes first and the oracle plays on: (N, len(actions)) long, at most 1 + max_actions,
    and max_actions + 2 where no gold is collected by then. Their argmin is the oracle improved by one step of
    policy iteration; near alignment several actions often tie (walk now, or after one more turn), and there the
    oracle's own choice is one of several equally short ones (or, now and then, not the shortest)."""
    n, k = len(settings_list), len(actions)
    batch = GameBatch([s for s in settings_list for _ in actions], device)
    got = batch.step(torch.tensor(actions, device=batch.device).repeat(n)) > 0
    cost = torch.where(got, 1, max_actions + 2)
    running = ~got & (batch.gold_left() > 0)
    for t in range(max_actions):
        if not running.any():
            break
        got = (batch.step(torch.where(running, batch.oracle_actions(backward), NOOP)) > 0) & running
        cost = torch.where(got, t + 2, cost)
        running &= ~got
    return cost.view(n, k)


# ----------------------------------------------------------------------------- command line

def _to_png(frame, path):
    from PIL import Image
    pixels = (frame.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()   # rows, columns, RGB
    Image.fromarray(pixels).save(path)


def _play(args):
    try:
        import pygame
    except ImportError:
        print("python game.py --play needs pygame (an optional extra): pip install pygame", file=sys.stderr)
        sys.exit(1)
    keys = {pygame.K_UP: FORWARD, pygame.K_DOWN: BACKWARD, pygame.K_LEFT: LEFT, pygame.K_RIGHT: RIGHT}
    rng = np.random.default_rng(args.seed)
    new_game = lambda: Game(random_bare_settings(rng) if args.bare else random_settings(rng))
    game, score = new_game(), 0
    pygame.init()
    screen = pygame.display.set_mode((args.size, args.size))
    while True:
        frame = (game.render(args.size) * 255).byte().permute(2, 1, 0).numpy()   # pygame wants (x, y, RGB)
        screen.blit(pygame.surfarray.make_surface(frame), (0, 0))
        pygame.display.set_caption(f"score {score}  (arrows move and turn, Esc quits)")
        pygame.display.flip()
        event = pygame.event.wait()
        if event.type == pygame.QUIT or (event.type == pygame.KEYDOWN and event.key == pygame.K_ESCAPE):
            break
        if event.type == pygame.KEYDOWN and event.key in keys:
            score += game.step(keys[event.key])
            if game.batch.gold_left()[0] == 0:
                game = new_game()
    pygame.quit()


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw a scene of the game to a PNG, or play it.")
    p.add_argument("--seed", type=int, default=0, help="scene seed")
    p.add_argument("--out", default="scene.png", help="PNG file to write")
    p.add_argument("--bare", action="store_true", help="a bare scene (side walls, one gold) instead of a full one")
    p.add_argument("--offset", type=float, default=0.3, help="bare scenes: max_agent_offset")
    p.add_argument("--size", type=int, default=224, help="image size in pixels")
    p.add_argument("--zoom", type=float, default=1.0, help="magnification (>= 1)")
    p.add_argument("--center", type=float, nargs=2, metavar=("X", "Y"), help="zoom centre (default: board centre)")
    p.add_argument("--line", action="store_true", help="draw the line-to-gold target instead")
    p.add_argument("--play", action="store_true", help="play with the arrow keys (needs pygame)")
    args = p.parse_args(argv)
    if args.play:
        args.size = max(args.size, 512)
        return _play(args)
    s = random_bare_settings(args.seed, args.offset) if args.bare else random_settings(args.seed)
    batch = GameBatch([s])
    center = None if args.center is None else [args.center]
    frame = batch.render(args.size, args.zoom, center, line=args.line)[0]
    _to_png(frame, args.out)
    print(f"wrote {args.out}: {s.to_json()}")


if __name__ == "__main__":
    main()
