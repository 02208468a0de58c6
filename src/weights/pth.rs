//! A strict reader of PyTorch checkpoints (`torch.save`'s zip format).
//!
//! The pickle inside is read by a small interpreter that knows the handful of objects a state
//! dict is made of (dicts, tuples, storages, `_rebuild_tensor_v2`, `_rebuild_parameter`) and
//! builds nothing else: no code in a file ever runs, and any other object becomes an opaque
//! value that is skipped. Each tensor is checked against its storage: the blob must exist and
//! hold whole elements, and every element the shape, strides and offset address must lie inside
//! it. Strides are honoured, so a saved view reads as the view. Allocations are bounded by the
//! file's own size: storages must be stored uncompressed (as `torch.save` writes them) and a
//! tensor may not have more elements than its storage.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result, bail, ensure};

/// One floating-point tensor of a checkpoint, converted to f32 and laid out row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct PthTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// The largest pickle read: a state dict's pickle is a few hundred KB, and each byte of pickle
/// can make at most one object, so this also bounds the reader's memory.
const MAX_PICKLE_BYTES: u64 = 8 << 20;

/// Reads the weights of a `torch.save`d file as `(name, tensor)` in the file's order: the
/// top-level dictionary's tensors, or those under `model`, `state_dict` or `model_ema` (training
/// checkpoints), with DataParallel's `module.` removed. Errors name the file and the tensor.
pub fn read(path: &Path) -> Result<Vec<(String, PthTensor)>> {
    let source = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {source}"))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        anyhow::anyhow!(
            "{source} is not a PyTorch checkpoint in torch.save's zip format ({e}); files written \
             by torch < 1.6 or with _use_new_zipfile_serialization=False must be saved again with \
             a current torch.save"
        )
    })?;
    let pkl = zip
        .file_names()
        .find(|n| (*n == "data.pkl" || n.ends_with("/data.pkl")) && n.matches('/').count() <= 1)
        .map(str::to_string)
        .with_context(|| format!("{source} is a zip file without a data.pkl: not a PyTorch checkpoint"))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    // Storages are little-endian unless the file says otherwise (torch writes `byteorder`).
    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        let _ = (&mut f).take(16).read_to_string(&mut order);
        ensure!(
            order.trim() != "big",
            "{source} was saved on a big-endian machine; load and save it again on a little-endian one"
        );
    }
    let mut bytes = Vec::new();
    zip.by_name(&pkl)?
        .take(MAX_PICKLE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {pkl} in {source}"))?;
    ensure!(
        bytes.len() as u64 <= MAX_PICKLE_BYTES,
        "{source}: its pickle is larger than {} MiB, far more than any state dict",
        MAX_PICKLE_BYTES >> 20
    );
    let mut m = Machine::default();
    let root = m
        .run(&bytes)
        .with_context(|| format!("{source}: unreadable pickle {pkl}"))?;
    let entries = m.weights(root).with_context(|| {
        format!("{source} holds no tensors (looked at the top level and under model, state_dict, model_ema)")
    })?;
    let strip = entries.iter().all(|(k, _)| k.starts_with("module."));
    let mut storages = Storages {
        zip,
        prefix,
        source: source.clone(),
        cache: HashMap::new(),
    };
    // Views may share a storage, but never by more than a few times its size: the bound keeps a
    // file from asking for far more memory than it holds.
    let mut budget = file_len.max(1 << 20);
    let mut out = Vec::with_capacity(entries.len());
    for (name, id) in entries {
        let name = if strip {
            name["module.".len()..].to_string()
        } else {
            name
        };
        let Obj::Tensor {
            storage,
            offset,
            shape,
            stride,
        } = &m.objs[id]
        else {
            unreachable!("weights() keeps tensors")
        };
        let Obj::Storage { dtype, key, numel } = &m.objs[*storage] else {
            unreachable!("checked in reduce")
        };
        let tensor = storages
            .blob(key)
            .and_then(|bytes| materialise(&bytes, *dtype, *numel, *offset, shape, stride))
            .map_err(|e| anyhow::anyhow!("{source}: tensor '{name}': {e}"))?;
        budget = budget.checked_sub(tensor.values.len() as u64).with_context(|| {
            format!("{source}: its tensors hold more elements than the file has bytes (views repeated past reason)")
        })?;
        out.push((name, tensor));
    }
    Ok(out)
}

// ---------------------------------------------------------------- pickle machine

/// Index of an object in the machine's arena. Containers are shared and mutated by index, as
/// the pickle's memo shares them, so no input can make the reader copy what it has read, and
/// dropping a deeply nested or cyclic structure is flat.
type Id = usize;

#[derive(Debug, Clone)]
enum Obj {
    None,
    Int(i64),
    Str(String),
    Other,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(String, String),
    Storage {
        dtype: Dtype,
        key: String,
        numel: Option<usize>,
    },
    Tensor {
        storage: Id,
        offset: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
    },
    /// An object of a class this reader does not build.
    Opaque,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    F32,
    F64,
    F16,
    Bf16,
    /// Integer or boolean storages: not weights.
    Other(&'static str, usize),
}

impl Dtype {
    fn of(storage: &str) -> Result<Self> {
        Ok(match storage {
            "FloatStorage" => Dtype::F32,
            "DoubleStorage" => Dtype::F64,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::Bf16,
            "LongStorage" => Dtype::Other("int64", 8),
            "IntStorage" => Dtype::Other("int32", 4),
            "ShortStorage" => Dtype::Other("int16", 2),
            "CharStorage" => Dtype::Other("int8", 1),
            "ByteStorage" => Dtype::Other("uint8", 1),
            "BoolStorage" => Dtype::Other("bool", 1),
            other => bail!("unknown storage type {other}"),
        })
    }

    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F64 => 8,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::Other(_, s) => s,
        }
    }

    fn decode(self, b: &[u8]) -> f32 {
        match self {
            Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32,
            Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::Other(..) => unreachable!("integer storages are refused before decoding"),
        }
    }
}

#[derive(Default)]
struct Machine {
    objs: Vec<Obj>,
    /// Container entries copied rather than moved (an `OrderedDict` built from a list), bounded
    /// by the pickle's length: a memoised list referenced again and again must not multiply.
    copied: usize,
}

/// The highest tensor rank read (weights have at most 5 dimensions).
const MAX_RANK: usize = 32;

/// What a call made: a new object, or one that exists (a parameter is its tensor).
enum Made {
    New(Obj),
    Existing(Id),
}

impl Machine {
    fn new_obj(&mut self, obj: Obj) -> Id {
        self.objs.push(obj);
        self.objs.len() - 1
    }

    /// Runs the pickle's opcodes. Only constructors of plain data are honoured; `REDUCE` and
    /// `NEWOBJ` of any other class give [`Obj::Opaque`], and `BUILD` sets no state.
    fn run(&mut self, data: &[u8]) -> Result<Id> {
        let mut r = Bytes { data, pos: 0 };
        let mut stack: Vec<Id> = Vec::new();
        let mut marks: Vec<usize> = Vec::new();
        let mut memo: HashMap<u32, Id> = HashMap::new();
        fn pop(stack: &mut Vec<Id>) -> Result<Id> {
            stack.pop().context("pickle stack underflow")
        }
        fn since_mark(stack: &mut Vec<Id>, marks: &mut Vec<usize>) -> Result<Vec<Id>> {
            let m = marks.pop().context("pickle mark missing")?;
            ensure!(m <= stack.len(), "pickle mark past the stack");
            Ok(stack.split_off(m))
        }
        loop {
            let op = r.u8()?;
            let made = match op {
                0x80 => {
                    r.u8()?; // PROTO
                    None
                }
                0x95 => {
                    r.take(8)?; // FRAME
                    None
                }
                b'.' => return pop(&mut stack),
                b'(' => {
                    marks.push(stack.len());
                    None
                }
                b'N' => Some(Obj::None),
                0x88 | 0x89 => Some(Obj::Other),
                b'K' => Some(Obj::Int(r.u8()? as i64)),
                b'M' => Some(Obj::Int(u16::from_le_bytes(r.array()?) as i64)),
                b'J' => Some(Obj::Int(i32::from_le_bytes(r.array()?) as i64)),
                0x8a => {
                    let n = r.u8()? as usize;
                    let b = r.take(n)?;
                    if n > 8 {
                        Some(Obj::Other) // a big integer: no size or offset is one
                    } else {
                        let fill = if b.last().is_some_and(|x| x & 0x80 != 0) {
                            0xff
                        } else {
                            0
                        };
                        let mut le = [fill; 8];
                        le[..n].copy_from_slice(b);
                        Some(Obj::Int(i64::from_le_bytes(le)))
                    }
                }
                b'G' => {
                    r.take(8)?;
                    Some(Obj::Other)
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => u32::from_le_bytes(r.array()?) as usize,
                        0x8c => r.u8()? as usize,
                        _ => usize::try_from(u64::from_le_bytes(r.array()?))?,
                    };
                    let s = std::str::from_utf8(r.take(n)?).context("string is not UTF-8")?;
                    Some(Obj::Str(s.to_string()))
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'T' | b'B' => u32::from_le_bytes(r.array()?) as usize,
                        0x8e => usize::try_from(u64::from_le_bytes(r.array()?))?,
                        _ => r.u8()? as usize,
                    };
                    r.take(n)?;
                    Some(Obj::Other)
                }
                b')' => Some(Obj::Tuple(vec![])),
                b']' => Some(Obj::List(vec![])),
                b'}' => Some(Obj::Dict(vec![])),
                0x8f => Some(Obj::Opaque), // EMPTY_SET
                b't' => Some(Obj::Tuple(since_mark(&mut stack, &mut marks)?)),
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    ensure!(stack.len() >= n, "pickle stack underflow");
                    Some(Obj::Tuple(stack.split_off(stack.len() - n)))
                }
                b'l' => Some(Obj::List(since_mark(&mut stack, &mut marks)?)),
                b'd' => Some(Obj::Dict(pairs(since_mark(&mut stack, &mut marks)?)?)),
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![pop(&mut stack)?]
                    } else {
                        since_mark(&mut stack, &mut marks)?
                    };
                    let target = *stack.last().context("APPEND to an empty stack")?;
                    if let Obj::List(v) = &mut self.objs[target] {
                        v.extend(items);
                    }
                    None
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = pop(&mut stack)?;
                        let k = pop(&mut stack)?;
                        vec![k, v]
                    } else {
                        since_mark(&mut stack, &mut marks)?
                    };
                    let items = pairs(items)?;
                    let target = *stack.last().context("SETITEM on an empty stack")?;
                    if let Obj::Dict(kv) = &mut self.objs[target] {
                        kv.extend(items);
                    }
                    None
                }
                0x90 => {
                    since_mark(&mut stack, &mut marks)?; // ADDITEMS (to a set)
                    None
                }
                b'q' | b'r' | 0x94 => {
                    let id = match op {
                        b'q' => r.u8()? as u32,
                        b'r' => u32::from_le_bytes(r.array()?),
                        _ => memo.len() as u32,
                    };
                    memo.insert(id, *stack.last().context("memo of an empty stack")?);
                    None
                }
                b'h' | b'j' => {
                    let id = if op == b'h' {
                        r.u8()? as u32
                    } else {
                        u32::from_le_bytes(r.array()?)
                    };
                    stack.push(
                        *memo
                            .get(&id)
                            .with_context(|| format!("memo entry {id} missing"))?,
                    );
                    None
                }
                b'c' => Some(Obj::Global(r.line()?, r.line()?)),
                0x93 => {
                    let name = pop(&mut stack)?;
                    let module = pop(&mut stack)?;
                    match (&self.objs[module], &self.objs[name]) {
                        (Obj::Str(m), Obj::Str(n)) => Some(Obj::Global(m.clone(), n.clone())),
                        _ => bail!("STACK_GLOBAL of non-strings"),
                    }
                }
                b'Q' => {
                    let pid = pop(&mut stack)?;
                    Some(self.persistent(pid)?)
                }
                b'R' | 0x81 => {
                    let args = pop(&mut stack)?;
                    let callable = pop(&mut stack)?;
                    match self.reduce(callable, args, data.len())? {
                        Made::New(obj) => Some(obj),
                        Made::Existing(id) => {
                            stack.push(id);
                            None
                        }
                    }
                }
                b'b' => {
                    pop(&mut stack)?; // BUILD: the state is not applied
                    ensure!(!stack.is_empty(), "BUILD on an empty stack");
                    None
                }
                b'0' => {
                    pop(&mut stack)?;
                    None
                }
                b'2' => {
                    let top = *stack.last().context("DUP of an empty stack")?;
                    stack.push(top);
                    None
                }
                other => bail!("pickle opcode 0x{other:02x} is not part of a state dict"),
            };
            if let Some(obj) = made {
                let id = self.new_obj(obj);
                stack.push(id);
            }
        }
    }

    /// The entries of the dictionary holding the weights that are tensors, by name.
    fn weights(&self, root: Id) -> Option<Vec<(String, Id)>> {
        let tensors = |dict: Id| -> Vec<(String, Id)> {
            let Obj::Dict(kv) = &self.objs[dict] else {
                return vec![];
            };
            kv.iter()
                .filter_map(|&(k, v)| match (&self.objs[k], &self.objs[v]) {
                    (Obj::Str(k), Obj::Tensor { .. }) => Some((k.clone(), v)),
                    _ => None,
                })
                .collect()
        };
        let top = tensors(root);
        if !top.is_empty() {
            return Some(top);
        }
        let Obj::Dict(kv) = &self.objs[root] else {
            return None;
        };
        ["model", "state_dict", "model_ema"].iter().find_map(|key| {
            kv.iter().find_map(|&(k, v)| match &self.objs[k] {
                Obj::Str(k) if k == key => Some(tensors(v)).filter(|t| !t.is_empty()),
                _ => None,
            })
        })
    }

    /// `('storage', torch.FloatStorage, key, location, numel)`.
    fn persistent(&self, pid: Id) -> Result<Obj> {
        let Obj::Tuple(t) = &self.objs[pid] else {
            bail!("persistent id is not a tuple")
        };
        ensure!(t.len() >= 3, "persistent id has {} parts, expected 5", t.len());
        match (&self.objs[t[0]], &self.objs[t[1]], &self.objs[t[2]]) {
            (Obj::Str(kind), Obj::Global(_, storage), Obj::Str(key)) if kind == "storage" => {
                Ok(Obj::Storage {
                    dtype: Dtype::of(storage)?,
                    key: key.clone(),
                    numel: match t.get(4).map(|&n| &self.objs[n]) {
                        Some(Obj::Int(n)) => Some(usize::try_from(*n).context("negative storage size")?),
                        _ => None,
                    },
                })
            }
            _ => bail!("persistent id is not a storage"),
        }
    }

    fn int(&self, id: Id, what: &str) -> Result<usize> {
        match self.objs[id] {
            Obj::Int(v) => usize::try_from(v).with_context(|| format!("negative {what} {v}")),
            _ => bail!("{what} is not an integer"),
        }
    }

    fn ints(&self, id: Id, what: &str) -> Result<Vec<usize>> {
        match &self.objs[id] {
            Obj::Tuple(v) | Obj::List(v) if v.len() > MAX_RANK => {
                bail!("a {what} of {} dimensions (at most {MAX_RANK})", v.len())
            }
            Obj::Tuple(v) | Obj::List(v) => v.iter().map(|&x| self.int(x, what)).collect(),
            _ => bail!("{what} is not a tuple"),
        }
    }

    /// The classes whose construction is plain data; every other call becomes [`Obj::Opaque`].
    fn reduce(&mut self, callable: Id, args: Id, pickle_len: usize) -> Result<Made> {
        let Obj::Global(module, name) = &self.objs[callable] else {
            return Ok(Made::New(Obj::Opaque));
        };
        let Obj::Tuple(a) = &self.objs[args] else {
            bail!("{module}.{name} called without an argument tuple")
        };
        Ok(Made::New(match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => match a.first().map(|&x| &self.objs[x]) {
                Some(Obj::List(items)) => {
                    self.copied += items.len();
                    ensure!(
                        self.copied <= pickle_len,
                        "the pickle builds dictionaries from the same items over and over"
                    );
                    Obj::Dict(
                        items
                            .iter()
                            .map(|&kv| match &self.objs[kv] {
                                Obj::Tuple(p) if p.len() == 2 => Ok((p[0], p[1])),
                                _ => bail!("OrderedDict item is not a pair"),
                            })
                            .collect::<Result<_>>()?,
                    )
                }
                _ => Obj::Dict(vec![]),
            },
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                ensure!(a.len() >= 4, "{name} with {} arguments", a.len());
                ensure!(
                    matches!(self.objs[a[0]], Obj::Storage { .. }),
                    "{name} of something that is not a storage"
                );
                Obj::Tensor {
                    storage: a[0],
                    offset: self.int(a[1], "storage offset")?,
                    shape: self.ints(a[2], "shape")?,
                    stride: self.ints(a[3], "stride")?,
                }
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => match a.first() {
                Some(&t) => return Ok(Made::Existing(t)),
                None => bail!("{name} without a tensor"),
            },
            _ => Obj::Opaque,
        }))
    }
}

fn pairs(items: Vec<Id>) -> Result<Vec<(Id, Id)>> {
    ensure!(
        items.len().is_multiple_of(2),
        "dictionary items come in an odd number"
    );
    Ok(items.chunks_exact(2).map(|p| (p[0], p[1])).collect())
}

// ---------------------------------------------------------------- storages and tensors

struct Storages<R: Read + std::io::Seek> {
    zip: zip::ZipArchive<R>,
    prefix: String,
    source: String,
    cache: HashMap<String, Rc<Vec<u8>>>,
}

impl<R: Read + std::io::Seek> Storages<R> {
    /// The bytes of storage `key`, read once however many tensors view it.
    fn blob(&mut self, key: &str) -> Result<Rc<Vec<u8>>, String> {
        if let Some(b) = self.cache.get(key) {
            return Ok(b.clone());
        }
        let name = format!("{}data/{key}", self.prefix);
        let mut f = self
            .zip
            .by_name(&name)
            .map_err(|_| format!("its storage {name} is missing from {}", self.source))?;
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(format!(
                "its storage {name} is compressed; torch.save stores storages uncompressed"
            ));
        }
        let size = f.size();
        let mut out = Vec::new();
        // Stored entries are no larger than the file; `take` guards against a lying header.
        (&mut f)
            .take(size)
            .read_to_end(&mut out)
            .map_err(|e| format!("cannot read its storage {name}: {e}"))?;
        if out.len() as u64 != size {
            return Err(format!(
                "its storage {name} is cut short ({} of {size} bytes)",
                out.len()
            ));
        }
        let b = Rc::new(out);
        self.cache.insert(key.to_string(), b.clone());
        Ok(b)
    }
}

/// Gathers a tensor from its storage bytes, checking every bound first.
fn materialise(
    bytes: &[u8],
    dtype: Dtype,
    numel: Option<usize>,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
) -> Result<PthTensor, String> {
    if let Dtype::Other(name, _) = dtype {
        return Err(format!(
            "it is {name}; weights must be floating point (f32, f64, f16 or bf16)"
        ));
    }
    let size = dtype.size();
    if !bytes.len().is_multiple_of(size) {
        return Err(format!(
            "its storage holds {} bytes, not a whole number of {size}-byte elements",
            bytes.len()
        ));
    }
    let have = bytes.len() / size;
    if let Some(n) = numel
        && n != have
    {
        return Err(format!("its storage should hold {n} elements but holds {have}"));
    }
    if shape.len() != stride.len() {
        return Err(format!("shape {shape:?} and strides {stride:?} differ in rank"));
    }
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let Some(count) = count.filter(|&c| c <= have) else {
        return Err(format!(
            "shape {shape:?} has more elements than its storage's {have}"
        ));
    };
    if count > 0 {
        let last = shape.iter().zip(stride).try_fold(offset, |a, (&d, &s)| {
            (d - 1).checked_mul(s).and_then(|x| a.checked_add(x))
        });
        if last.is_none_or(|l| l >= have) {
            return Err(format!(
                "shape {shape:?} with strides {stride:?} at offset {offset} reads past the end of its storage of {have} elements"
            ));
        }
    }
    let mut values = Vec::with_capacity(count);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..count {
        let at = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        values.push(dtype.decode(&bytes[at * size..(at + 1) * size]));
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(PthTensor {
        shape: shape.to_vec(),
        values,
    })
}

struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .context("pickle ends early")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("pickle ends inside a name")?;
        let s = std::str::from_utf8(&rest[..n])
            .context("name is not UTF-8")?
            .to_string();
        self.pos += n + 1;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_views_read_as_views() {
        // A 2×3 storage read transposed (strides 1, 3) from offset 0, and a column from offset 1.
        let bytes: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let t = materialise(&bytes, Dtype::F32, Some(6), 0, &[3, 2], &[1, 3]).unwrap();
        assert_eq!(t.values, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let col = materialise(&bytes, Dtype::F32, Some(6), 1, &[2], &[3]).unwrap();
        assert_eq!(col.values, [1.0, 4.0]);
        let half: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(
            materialise(&half, Dtype::F16, None, 0, &[2], &[1])
                .unwrap()
                .values,
            [1.5, -2.0]
        );
    }

    #[test]
    fn out_of_bounds_views_and_integer_storages_are_refused() {
        let bytes = vec![0u8; 24];
        let err = |r: Result<PthTensor, String>| r.unwrap_err();
        assert!(err(materialise(&bytes, Dtype::F32, Some(6), 4, &[3], &[1])).contains("past the end"));
        assert!(err(materialise(&bytes, Dtype::F32, Some(6), 0, &[7], &[1])).contains("more elements"));
        assert!(err(materialise(&bytes, Dtype::F32, Some(6), 0, &[2, 2], &[5, 1])).contains("past the end"));
        assert!(err(materialise(&bytes, Dtype::F32, Some(9), 0, &[2], &[1])).contains("should hold 9"));
        assert!(err(materialise(&bytes[..23], Dtype::F32, None, 0, &[2], &[1])).contains("whole number"));
        assert!(
            err(materialise(
                &bytes,
                Dtype::F32,
                None,
                0,
                &[usize::MAX, 2],
                &[1, 1]
            ))
            .contains("more elements")
        );
        assert!(err(materialise(&bytes, Dtype::Other("int32", 4), None, 0, &[2], &[1])).contains("int32"));
    }

    #[test]
    fn only_plain_data_is_built() {
        // os.system('x') as a pickle: GLOBAL, a tuple argument, REDUCE, STOP.
        let mut m = Machine::default();
        let id = m.run(b"\x80\x02cos\nsystem\nX\x01\x00\x00\x00x\x85R.").unwrap();
        assert!(matches!(&m.objs[id], Obj::Opaque));
        // Deep nesting is built flat and dropped flat.
        let mut deep = b"\x80\x02N".to_vec();
        deep.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        deep.push(b'.');
        Machine::default().run(&deep).unwrap();
        // A memoised list of 1000 pairs made into a dictionary 100 times: copies bounded.
        let mut bomb = b"\x80\x02](".to_vec();
        bomb.extend(std::iter::repeat_n(&b"))\x86"[..], 1000).flatten());
        bomb.extend(b"eq\x00");
        for _ in 0..100 {
            bomb.extend(b"ccollections\nOrderedDict\nh\x00\x85R0");
        }
        bomb.extend(b"N.");
        let err = format!("{:#}", Machine::default().run(&bomb).unwrap_err());
        assert!(err.contains("over and over"), "{err}");
        for (bad, why) in [
            (&b"\x80\x02("[..], "ends early"),
            (b"\x80\x02t.", "mark missing"),
            (b"\x80\x02h\x05.", "memo entry 5"),
            (b"\x80\x02\xff.", "opcode 0xff"),
        ] {
            let err = format!("{:#}", Machine::default().run(bad).unwrap_err());
            assert!(err.contains(why), "{err}");
        }
    }
}
