// NIfTI-1/NIfTI-2 reader (gzipped or not, either byte order) -> a volume reoriented to RAS+.
// Gzip is undone with the browser's own DecompressionStream; voxels are scaled by scl_slope/scl_inter.

const TYPES = {  // datatype code -> [bytes, DataView getter, TypedArray]
  2: [1, "getUint8", Uint8Array], 4: [2, "getInt16", Int16Array], 8: [4, "getInt32", Int32Array],
  16: [4, "getFloat32", Float32Array], 64: [8, "getFloat64", Float64Array], 256: [1, "getInt8", Int8Array],
  512: [2, "getUint16", Uint16Array], 768: [4, "getUint32", Uint32Array],
};

async function gunzip(buffer) {
  const stream = new Blob([buffer]).stream().pipeThrough(new DecompressionStream("gzip"));
  return new Response(stream).arrayBuffer();
}

function header(view) {
  let le = true;
  let size = view.getInt32(0, le);
  if (size !== 348 && size !== 540) { le = false; size = view.getInt32(0, le); }
  if (size === 348) {
    const f = (o) => view.getFloat32(o, le);
    return {
      le, minOffset: 352, dim: Array.from({ length: 8 }, (_, i) => view.getInt16(40 + 2 * i, le)),
      datatype: view.getInt16(70, le), pixdim: Array.from({ length: 8 }, (_, i) => f(76 + 4 * i)),
      voxOffset: f(108), slope: f(112), inter: f(116),
      qformCode: view.getInt16(252, le), sformCode: view.getInt16(254, le),
      quat: [f(256), f(260), f(264)], qoffset: [f(268), f(272), f(276)],
      srow: [0, 1, 2].map((r) => [0, 1, 2, 3].map((c) => f(280 + 16 * r + 4 * c))),
    };
  }
  if (size === 540) {
    const d = (o) => view.getFloat64(o, le);
    const i64 = (o) => Number(view.getBigInt64(o, le));
    return {
      le, minOffset: 544, dim: Array.from({ length: 8 }, (_, i) => i64(16 + 8 * i)), datatype: view.getInt16(12, le),
      pixdim: Array.from({ length: 8 }, (_, i) => d(104 + 8 * i)), voxOffset: i64(168), slope: d(176), inter: d(184),
      qformCode: view.getInt32(344, le), sformCode: view.getInt32(348, le),
      quat: [d(352), d(360), d(368)], qoffset: [d(376), d(384), d(392)],
      srow: [0, 1, 2].map((r) => [0, 1, 2, 3].map((c) => d(400 + 32 * r + 8 * c))),
    };
  }
  throw new Error("not a NIfTI-1 or NIfTI-2 file");
}

/** The 3x4 voxel -> world (RAS mm) matrix: sform, else qform, else the voxel sizes. */
function affine(hd) {
  if (hd.sformCode > 0) return hd.srow;
  const [sx, sy, sz] = [hd.pixdim[1] || 1, hd.pixdim[2] || 1, hd.pixdim[3] || 1];
  if (hd.qformCode > 0) {
    const [b, c, d] = hd.quat;
    const a = Math.sqrt(Math.max(0, 1 - b * b - c * c - d * d));
    const qfac = hd.pixdim[0] < 0 ? -1 : 1;
    const R = [
      [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
      [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
      [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ];
    const s = [sx, sy, sz * qfac];
    return R.map((row, r) => [...row.map((v, i) => v * s[i]), hd.qoffset[r]]);
  }
  return [[sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0]];
}

/** For each voxel axis: the world axis it runs along most (0=R, 1=A, 2=S) and its direction. */
function orientation(M) {
  const used = new Set();
  const out = [];
  const order = [0, 1, 2].sort((i, j) => Math.max(...[0, 1, 2].map((r) => Math.abs(M[r][j])))
    - Math.max(...[0, 1, 2].map((r) => Math.abs(M[r][i]))));
  for (const i of order) {
    let best = -1;
    for (const r of [0, 1, 2]) if (!used.has(r) && (best < 0 || Math.abs(M[r][i]) > Math.abs(M[best][i]))) best = r;
    used.add(best);
    out[i] = { axis: best, flip: M[best][i] < 0, spacing: Math.hypot(M[0][i], M[1][i], M[2][i]) || 1 };
  }
  return out;
}

function voxels(buffer, hd, n) {
  const type = TYPES[hd.datatype];
  if (!type) throw new Error(`NIfTI datatype ${hd.datatype} is not supported here`);
  const [bytes, getter, Typed] = type;
  const offset = Math.floor(hd.voxOffset) || hd.minOffset;
  if (offset + n * bytes > buffer.byteLength) throw new Error("the file is shorter than its header says");
  let raw;
  if (hd.le) {
    raw = new Typed(buffer.slice(offset, offset + n * bytes));
  } else {
    const view = new DataView(buffer, offset, n * bytes);
    raw = new Typed(n);
    for (let i = 0; i < n; i++) raw[i] = view[getter](i * bytes, false);
  }
  const slope = hd.slope && Number.isFinite(hd.slope) ? hd.slope : 1;
  const inter = Number.isFinite(hd.inter) ? hd.inter : 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const v = raw[i] * slope + inter;
    out[i] = Number.isFinite(v) ? v : 0;
  }
  return out;
}

/** Values at the given fractions of the sorted non-zero voxels (a sample of them; enough for windowing). */
function percentiles(data, fractions) {
  const step = Math.max(1, Math.floor(data.length / 400_000));
  const sample = [];
  for (let i = 0; i < data.length; i += step) if (data[i] !== 0) sample.push(data[i]);
  if (!sample.length) return fractions.map(() => 0);
  sample.sort((a, b) => a - b);
  return fractions.map((f) => sample[Math.min(sample.length - 1, Math.floor(f * sample.length))]);
}

/** Parse NIfTI bytes into {dims: [nx, ny, nz], spacing, data (x fastest, RAS+ order), low, high, min, max}. */
export async function readNifti(buffer) {
  const head = new Uint8Array(buffer, 0, 2);
  if (head[0] === 0x1f && head[1] === 0x8b) buffer = await gunzip(buffer);
  const hd = header(new DataView(buffer));
  const nd = hd.dim[0];
  const dims = [1, 2, 3].map((i) => (i <= nd ? Math.max(1, hd.dim[i]) : 1));
  if (nd > 3 && hd.dim.slice(4, nd + 1).some((d) => d > 1)) throw new Error("only 3D volumes can be shown");
  const n = dims[0] * dims[1] * dims[2];
  const src = voxels(buffer, hd, n);
  const ornt = orientation(affine(hd));
  // reorient: output axis ornt[i].axis takes input axis i, reversed when it runs the other way
  const outDims = [0, 0, 0];
  const spacing = [1, 1, 1];
  ornt.forEach((o, i) => { outDims[o.axis] = dims[i]; spacing[o.axis] = o.spacing; });
  const stride = [1, outDims[0], outDims[0] * outDims[1]];
  const inStride = ornt.map((o) => (o.flip ? -stride[o.axis] : stride[o.axis]));
  const base = ornt.reduce((acc, o, i) => acc + (o.flip ? (dims[i] - 1) * stride[o.axis] : 0), 0);
  const data = new Float32Array(n);
  let p = 0;
  for (let k = 0; k < dims[2]; k++) {
    for (let j = 0; j < dims[1]; j++) {
      let q = base + j * inStride[1] + k * inStride[2];
      for (let i = 0; i < dims[0]; i++, p++, q += inStride[0]) data[q] = src[p];
    }
  }
  let min = Infinity, max = -Infinity;
  for (let i = 0; i < n; i++) { const v = data[i]; if (v < min) min = v; if (v > max) max = v; }
  const [low, high] = percentiles(data, [0.005, 0.995]);
  return { dims: outDims, spacing, data, min, max, low: Math.min(low, 0), high: high || max || 1 };
}
