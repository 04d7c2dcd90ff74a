//! A safe reader and writer for the pickle inside PyTorch's `torch.save` files, restricted to
//! what a plain tensor needs. No code from the file is ever run: only a whitelist of globals
//! (tensor rebuild functions, storage classes, `OrderedDict`) is understood, as data; any
//! other global, and any opcode outside the small set below, is refused.

use std::collections::HashMap;

/// The element type of a torch storage class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    BF16,
    F64,
    /// int64: an attention mask's storage (read as f32: its 0s and 1s are exact).
    I64,
}

impl StorageDtype {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "DoubleStorage" => Self::F64,
            "LongStorage" => Self::I64,
            _ => return None,
        })
    }

    pub fn size(&self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::F64 | Self::I64 => 8,
        }
    }

    pub fn class_name(&self) -> &'static str {
        match self {
            Self::F32 => "FloatStorage",
            Self::F16 => "HalfStorage",
            Self::BF16 => "BFloat16Storage",
            Self::F64 => "DoubleStorage",
            Self::I64 => "LongStorage",
        }
    }
}

/// A tensor described by the pickle: where its data lives and how to view it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage_key: String,
    pub dtype: StorageDtype,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(usize),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage(String, StorageDtype),
    Tensor(TensorRef),
    Mark,
}

const ALLOWED: &[(&str, &str)] = &[
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"),
    // What protocol 2 (torch.save's default) writes for the plain data of a checkpoint's
    // metadata: sets and bytes. Built here as data; nothing of Python's is called.
    ("builtins", "set"),
    ("__builtin__", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "frozenset"),
    ("_codecs", "encode"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
];

/// What can go wrong reading the pickle; mapped to a file error by the caller.
pub type PickleResult<T> = std::result::Result<T, String>;

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> PickleResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or("pickle ends early")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> PickleResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PickleResult<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> PickleResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    /// An 8-byte length that must fit in the data left.
    fn u64_len(&mut self) -> PickleResult<usize> {
        let b = self.take(8)?;
        let n = u64::from_le_bytes(b.try_into().unwrap());
        usize::try_from(n).map_err(|_| "length too large".to_string())
    }

    fn line(&mut self) -> PickleResult<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated line")?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| "non-UTF-8 name")?
            .to_string();
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> PickleResult<String> {
        Ok(std::str::from_utf8(self.take(n)?)
            .map_err(|_| "non-UTF-8 string")?
            .to_string())
    }
}

fn pop_mark(stack: &mut Vec<Value>) -> PickleResult<Vec<Value>> {
    let m = stack
        .iter()
        .rposition(|v| *v == Value::Mark)
        .ok_or("MARK missing")?;
    let items = stack.split_off(m + 1);
    stack.pop();
    Ok(items)
}

fn as_usize(v: &Value) -> PickleResult<usize> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => Err(format!("expected a non-negative integer, found {other:?}")),
    }
}

fn usize_tuple(v: &Value) -> PickleResult<Vec<usize>> {
    match v {
        Value::Tuple(items) => items.iter().map(as_usize).collect(),
        other => Err(format!("expected a tuple of sizes, found {other:?}")),
    }
}

/// Applies a whitelisted callable to its arguments.
fn reduce(func: Value, args: Value) -> PickleResult<Value> {
    let Value::Global(module, name) = func else {
        return Err("REDUCE on a non-callable".into());
    };
    let Value::Tuple(args) = args else {
        return Err("REDUCE arguments are not a tuple".into());
    };
    match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") => {
            if args.len() < 4 {
                return Err("_rebuild_tensor_v2 needs storage, offset, size, stride".into());
            }
            let Value::Storage(key, dtype) = &args[0] else {
                return Err("_rebuild_tensor_v2 without a storage".into());
            };
            Ok(Value::Tensor(TensorRef {
                storage_key: key.clone(),
                dtype: *dtype,
                offset: as_usize(&args[1])?,
                shape: usize_tuple(&args[2])?,
                stride: usize_tuple(&args[3])?,
            }))
        }
        ("torch._utils", "_rebuild_parameter") => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("_rebuild_parameter without a tensor".into()),
        },
        ("collections", "OrderedDict") => Ok(Value::Dict(vec![])),
        ("builtins" | "__builtin__", "set" | "frozenset") => match args.into_iter().next() {
            Some(Value::List(items)) => Ok(Value::List(items)),
            None => Ok(Value::List(vec![])),
            _ => Err(format!("{module}.{name} of something other than a list")),
        },
        ("_codecs", "encode") => match args.first() {
            Some(Value::Str(s)) => Ok(Value::Bytes(s.len())),
            _ => Err("_codecs.encode of something other than a string".into()),
        },
        _ => Err(format!("refused callable {module}.{name}")),
    }
}

/// Parses a `data.pkl` whose payload is one tensor. Anything else is an error.
pub fn read_tensor(data: &[u8]) -> PickleResult<TensorRef> {
    match parse(data)? {
        Value::Tensor(t) => Ok(t),
        other => Err(format!(
            "the file holds {}, not a single tensor",
            describe(&other)
        )),
    }
}

/// Parses a `data.pkl` whose payload is a state dict (`{name: tensor}`, possibly nested as
/// `{"state_dict": {...}}`; nested names are joined with "."). Non-tensor entries (epoch
/// counters, ...) are skipped.
pub fn read_state_dict(data: &[u8]) -> PickleResult<Vec<(String, TensorRef)>> {
    fn flatten(prefix: &str, v: Value, out: &mut Vec<(String, TensorRef)>) {
        match v {
            Value::Tensor(t) => out.push((prefix.to_string(), t)),
            Value::Dict(items) => {
                for (k, v) in items {
                    let key = match k {
                        Value::Str(s) => s,
                        Value::Int(i) => i.to_string(),
                        _ => continue,
                    };
                    let name = if prefix.is_empty() {
                        key
                    } else {
                        format!("{prefix}.{key}")
                    };
                    flatten(&name, v, out);
                }
            }
            _ => {}
        }
    }
    match parse(data)? {
        v @ Value::Dict(_) => {
            let mut out = vec![];
            flatten("", v, &mut out);
            Ok(out)
        }
        other => Err(format!(
            "the file holds {}, not a state dict",
            describe(&other)
        )),
    }
}

/// Runs the restricted unpickler and returns the top-level value.
fn parse(data: &[u8]) -> PickleResult<Value> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Value> = vec![];
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| "stack underflow".to_string());
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} is not supported"));
                }
            }
            0x95 => {
                r.take(8)?; // FRAME length: frames are read transparently
            }
            b'.' => break,
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            b'J' => stack.push(Value::Int(r.u32()? as i32 as i64)),
            0x8a => {
                let n = r.u8()? as usize;
                stack.push(Value::Int(long_le(r.take(n)?)?));
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(
                r.take(8)?.try_into().unwrap(),
            ))),
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8d => {
                let n = r.u64_len()?;
                stack.push(Value::Str(r.string(n)?));
            }
            // Byte strings (checkpoint metadata): kept as their length only; never decoded.
            b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.len()));
            }
            b'B' => {
                let n = r.u32()? as usize;
                stack.push(Value::Bytes(r.take(n)?.len()));
            }
            0x8e => {
                let n = r.u64_len()?;
                stack.push(Value::Bytes(r.take(n)?.len()));
            }
            // Protocol 0-2 strings and numbers (pickles written by older Pythons and by
            // Lightning's metadata).
            b'U' => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            b'T' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            b'V' | b'S' => {
                let line = r.line()?;
                stack.push(Value::Str(line));
            }
            b'I' | b'L' => {
                let line = r.line()?;
                let t = line.trim_end_matches('L');
                stack.push(match t {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => Value::Int(t.parse().map_err(|_| format!("bad integer {line:?}"))?),
                });
            }
            b'F' => {
                let line = r.line()?;
                stack.push(Value::Float(
                    line.parse().map_err(|_| format!("bad float {line:?}"))?,
                ));
            }
            0x8b => {
                let n = r.u32()? as usize;
                stack.push(Value::Int(long_le(r.take(n)?)?));
            }
            // Sets are kept as lists: nothing here needs their semantics.
            0x8f => stack.push(Value::List(vec![])),
            0x90 => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err("ADDITEMS without a set".into()),
                }
            }
            0x91 => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(items));
            }
            b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack)?;
            }
            b'2' => {
                let top = stack.last().cloned().ok_or("DUP on an empty stack")?;
                stack.push(top);
            }
            b')' => stack.push(Value::Tuple(vec![])),
            b']' => stack.push(Value::List(vec![])),
            b'}' => stack.push(Value::Dict(vec![])),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err("APPENDS without a list".into()),
                }
            }
            b'a' => {
                let item = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(item),
                    _ => return Err("APPEND without a list".into()),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                let Some(Value::Dict(d)) = stack.last_mut() else {
                    return Err("SETITEMS without a dict".into());
                };
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => return Err("SETITEM without a dict".into()),
                }
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                push_global(&mut stack, module, name)?;
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err("STACK_GLOBAL needs two strings".into());
                };
                push_global(&mut stack, module, name)?;
            }
            b'q' => {
                let k = r.u8()? as u32;
                memo.insert(k, stack.last().cloned().ok_or("empty stack")?);
            }
            b'r' => {
                let k = r.u32()?;
                memo.insert(k, stack.last().cloned().ok_or("empty stack")?);
            }
            0x94 => {
                let k = memo.len() as u32;
                memo.insert(k, stack.last().cloned().ok_or("empty stack")?);
            }
            b'h' => {
                let k = r.u8()? as u32;
                stack.push(memo.get(&k).cloned().ok_or("unknown memo key")?);
            }
            b'j' => {
                let k = r.u32()?;
                stack.push(memo.get(&k).cloned().ok_or("unknown memo key")?);
            }
            b'Q' => {
                // Persistent id: ('storage', StorageClass, key, location, numel).
                let pid = pop(&mut stack)?;
                let Value::Tuple(items) = pid else {
                    return Err("persistent id is not a tuple".into());
                };
                match items.as_slice() {
                    [Value::Str(kind), Value::Global(_, class), Value::Str(key), _, _, ..]
                        if kind == "storage" =>
                    {
                        let dtype = StorageDtype::from_class(class)
                            .ok_or_else(|| format!("storage type {class} is not supported"))?;
                        stack.push(Value::Storage(key.clone(), dtype));
                    }
                    _ => return Err("unexpected persistent id".into()),
                }
            }
            b'b' => {
                // BUILD: state for the object below it. A state dict's `_metadata` (module
                // versions) arrives this way; it is data we do not need, so it is dropped.
                let _state = pop(&mut stack)?;
                match stack.last() {
                    Some(Value::Dict(_)) => {}
                    _ => return Err("BUILD on something other than a dict".into()),
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                stack.push(reduce(func, args)?);
            }
            other => {
                return Err(format!(
                    "pickle opcode 0x{other:02x} is not allowed in a tensor file"
                ))
            }
        }
    }
    match (stack.pop(), stack.is_empty()) {
        (Some(v), true) => Ok(v),
        (Some(_), false) => Err("unexpected extra values in the pickle".into()),
        (None, _) => Err("empty pickle".into()),
    }
}

/// A LONG1/LONG4 integer: little-endian two's complement of at most 8 bytes.
fn long_le(bytes: &[u8]) -> PickleResult<i64> {
    let n = bytes.len();
    if n > 8 {
        return Err("integer too large".into());
    }
    let mut buf = [0u8; 8];
    buf[..n].copy_from_slice(bytes);
    if n > 0 && bytes[n - 1] & 0x80 != 0 {
        buf[n..].fill(0xff);
    }
    Ok(i64::from_le_bytes(buf))
}

fn push_global(stack: &mut Vec<Value>, module: String, name: String) -> PickleResult<()> {
    if !ALLOWED.contains(&(module.as_str(), name.as_str())) {
        return Err(format!(
            "refused to load `{module}.{name}`: only plain tensors are read, never code"
        ));
    }
    stack.push(Value::Global(module, name));
    Ok(())
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Tensor(_) => "a tensor",
        Value::Dict(_) => "a dict",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Str(_) => "a string",
        Value::Int(_) | Value::Float(_) | Value::Bool(_) => "a number",
        Value::None => "None",
        _ => "something else",
    }
}

/// The pickle of one contiguous tensor as `torch.save` writes it (protocol 2).
pub fn write_tensor(dtype: StorageDtype, shape: &[usize], storage_key: &str) -> Vec<u8> {
    let mut out = vec![0x80, 2];
    tensor_body(&mut out, dtype, shape, storage_key);
    out.push(b'.');
    out
}

/// The pickle of a dict of contiguous tensors, `{name: tensor}` in the given order, as
/// `torch.save({...})` writes it: each entry (name, dtype, shape, storage key).
pub fn write_dict(entries: &[(&str, StorageDtype, Vec<usize>, String)]) -> Vec<u8> {
    let mut out = vec![0x80, 2, b'}', b'('];
    for (name, dtype, shape, key) in entries {
        unicode(&mut out, name);
        tensor_body(&mut out, *dtype, shape, key);
    }
    out.extend(b"u.");
    out
}

/// A string as pickle's BINUNICODE.
fn unicode(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

/// `torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())`, left on
/// the stack.
fn tensor_body(out: &mut Vec<u8>, dtype: StorageDtype, shape: &[usize], storage_key: &str) {
    fn int(out: &mut Vec<u8>, v: usize) {
        if v < 256 {
            out.extend([b'K', v as u8]);
        } else if v < 65536 {
            out.push(b'M');
            out.extend((v as u16).to_le_bytes());
        } else {
            out.push(b'J');
            out.extend((v as i32).to_le_bytes());
        }
    }
    fn tuple(out: &mut Vec<u8>, items: &[usize]) {
        out.push(b'(');
        for &i in items {
            int(out, i);
        }
        out.push(b't');
    }
    let numel: usize = shape.iter().product();
    let mut stride = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        stride[i] = stride[i + 1] * shape[i + 1];
    }
    out.extend(b"ctorch._utils\n_rebuild_tensor_v2\n");
    out.extend(b"((");
    unicode(out, "storage");
    out.extend(format!("ctorch\n{}\n", dtype.class_name()).as_bytes());
    unicode(out, storage_key);
    unicode(out, "cpu");
    int(out, numel);
    out.extend(b"tQ");
    int(out, 0);
    tuple(out, shape);
    tuple(out, &stride);
    out.push(0x89);
    out.extend(b"ccollections\nOrderedDict\n)R");
    out.extend(b"tR");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pickle_reads_back() {
        let p = write_tensor(StorageDtype::F32, &[1, 77, 768], "0");
        let t = read_tensor(&p).unwrap();
        assert_eq!(t.shape, vec![1, 77, 768]);
        assert_eq!(t.stride, vec![77 * 768, 768, 1]);
        assert_eq!(
            (t.offset, t.dtype, t.storage_key.as_str()),
            (0, StorageDtype::F32, "0")
        );
    }

    #[test]
    fn code_is_refused() {
        let evil = b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00echo\x85R.";
        let err = read_tensor(evil).unwrap_err();
        assert!(err.contains("posix.system"), "{err}");
    }
}
