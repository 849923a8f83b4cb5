//! A restricted pickle reader for PyTorch checkpoints: like `torch.load(weights_only=True)`, it
//! never executes anything.
//!
//! It runs the pickle opcodes that `torch.save` emits (protocols 2–5) on a stack machine whose
//! values are plain data. `GLOBAL` may only name the few callables a state dict needs — tensor
//! rebuilders, storage types, `OrderedDict` — and `REDUCE` on them builds data, not objects. Any
//! other global (`os.system`, `builtins.eval`, …) or an opcode that instantiates arbitrary
//! classes is refused with an error naming it, before anything is called.
//!
//! Values live in an arena and the stack and memo hold indices, so a dict that is memoised and
//! filled later (as pickle does) is the same dict wherever it is referenced.

use std::collections::BTreeMap;

/// Callables a checkpoint may reference, as `(module, name)`.
const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// Element types of tensor storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    Float,
    Half,
    BFloat16,
    Double,
    Long,
    Int,
    Short,
    Char,
    Byte,
    Bool,
}

impl StorageType {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => StorageType::Float,
            "HalfStorage" => StorageType::Half,
            "BFloat16Storage" => StorageType::BFloat16,
            "DoubleStorage" => StorageType::Double,
            "LongStorage" => StorageType::Long,
            "IntStorage" => StorageType::Int,
            "ShortStorage" => StorageType::Short,
            "CharStorage" => StorageType::Char,
            "ByteStorage" => StorageType::Byte,
            "BoolStorage" => StorageType::Bool,
            _ => return None,
        })
    }

    pub fn element_size(self) -> usize {
        match self {
            StorageType::Double | StorageType::Long => 8,
            StorageType::Float | StorageType::Int => 4,
            StorageType::Half | StorageType::BFloat16 | StorageType::Short => 2,
            StorageType::Char | StorageType::Byte | StorageType::Bool => 1,
        }
    }
}

/// A tensor as the pickle describes it: a view into a storage record of the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage_key: String,
    pub storage_type: StorageType,
    pub storage_numel: usize,
    pub offset: usize,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// Plain data decoded from a pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Insertion-ordered (dicts and `OrderedDict`s alike).
    Dict(Vec<(Value, Value)>),
    Tensor(TensorRef),
}

impl Value {
    /// The value under string key `key` of a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error(
        "refusing to load: the pickle references `{module}.{name}`, which a checkpoint never needs (only tensors, storages and OrderedDict are allowed; nothing is executed)"
    )]
    ForbiddenGlobal { module: String, name: String },
    #[error("refusing to load: pickle opcode {opcode} at byte {position} would construct an arbitrary object")]
    ForbiddenOpcode { opcode: String, position: usize },
    #[error("unsupported pickle opcode 0x{opcode:02x} at byte {position}")]
    UnknownOpcode { opcode: u8, position: usize },
    #[error("malformed pickle at byte {position}: {reason}")]
    Malformed { position: usize, reason: String },
}

/// Arena slots: finished values, or callables/markers that only exist while parsing.
#[derive(Debug, Clone)]
enum Slot {
    Value(Value),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global(&'static str, &'static str),
    Storage(StorageType, String, usize),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    arena: Vec<Slot>,
    stack: Vec<usize>,
    marks: Vec<usize>,
    memo: BTreeMap<u64, usize>,
}

/// Decodes a pickle into plain data.
///
/// # Errors
/// [`PickleError::ForbiddenGlobal`] / [`PickleError::ForbiddenOpcode`] for anything that would
/// run code, and [`PickleError::Malformed`] / [`PickleError::UnknownOpcode`] for broken input.
pub fn load(data: &[u8]) -> Result<Value, PickleError> {
    let mut m =
        Machine { data, pos: 0, arena: Vec::new(), stack: Vec::new(), marks: Vec::new(), memo: BTreeMap::new() };
    let top = m.run()?;
    m.resolve(top, 0)
}

impl<'a> Machine<'a> {
    fn malformed(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Malformed { position: self.pos, reason: reason.into() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| self.malformed("truncated"))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> Result<u64, PickleError> {
        let bytes = self.take(n)?;
        Ok(bytes.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.malformed("unterminated line"))?;
        let line = std::str::from_utf8(&rest[..end]).map_err(|_| self.malformed("line is not UTF-8"))?;
        self.pos += end + 1;
        Ok(line)
    }

    fn utf8(&mut self, n: usize) -> Result<String, PickleError> {
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.malformed("string is not UTF-8"))
    }

    fn alloc(&mut self, slot: Slot) -> usize {
        self.arena.push(slot);
        self.arena.len() - 1
    }

    fn push(&mut self, slot: Slot) {
        let id = self.alloc(slot);
        self.stack.push(id);
    }

    fn pop(&mut self) -> Result<usize, PickleError> {
        self.stack.pop().ok_or_else(|| self.malformed("stack underflow"))
    }

    fn top(&self) -> Result<usize, PickleError> {
        self.stack.last().copied().ok_or_else(|| self.malformed("empty stack"))
    }

    fn pop_mark(&mut self) -> Result<Vec<usize>, PickleError> {
        let mark = self.marks.pop().ok_or_else(|| self.malformed("no MARK"))?;
        if mark > self.stack.len() {
            return Err(self.malformed("MARK above the stack"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        let allowed = ALLOWED_GLOBALS
            .iter()
            .find(|(m, n)| *m == module && *n == name)
            .ok_or_else(|| PickleError::ForbiddenGlobal { module: module.into(), name: name.into() })?;
        self.push(Slot::Global(allowed.0, allowed.1));
        Ok(())
    }

    fn memo_get(&self, key: u64) -> Result<usize, PickleError> {
        self.memo.get(&key).copied().ok_or_else(|| self.malformed(format!("memo key {key} was never stored")))
    }

    fn run(&mut self) -> Result<usize, PickleError> {
        loop {
            let position = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO n
                }
                0x95 => {
                    self.take(8)?; // FRAME: a size hint only
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                b'N' => self.push(Slot::Value(Value::None)),
                0x88 => self.push(Slot::Value(Value::Bool(true))),
                0x89 => self.push(Slot::Value(Value::Bool(false))),
                b'J' => {
                    let v = self.le(4)? as u32 as i32 as i64;
                    self.push(Slot::Value(Value::Int(v)));
                }
                b'K' => {
                    let v = self.le(1)? as i64;
                    self.push(Slot::Value(Value::Int(v)));
                }
                b'M' => {
                    let v = self.le(2)? as i64;
                    self.push(Slot::Value(Value::Int(v)));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.le(4)? as usize };
                    if n > 8 {
                        return Err(self.malformed(format!("integer of {n} bytes does not fit in 64 bits")));
                    }
                    let bytes = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &b) in bytes.iter().enumerate() {
                        v |= (b as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // two's complement sign
                    }
                    self.push(Slot::Value(Value::Int(v)));
                }
                b'G' => {
                    let bytes: [u8; 8] = self.take(8)?.try_into().expect("8 bytes");
                    self.push(Slot::Value(Value::Float(f64::from_be_bytes(bytes))));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => self.u8()? as usize,
                        b'X' => self.le(4)? as usize,
                        _ => self.le(8)? as usize,
                    };
                    let s = self.utf8(n)?;
                    self.push(Slot::Value(Value::Str(s)));
                }
                b'C' | b'B' | 0x8e | b'U' | b'T' => {
                    let n = match op {
                        b'C' | b'U' => self.u8()? as usize,
                        b'B' | b'T' => self.le(4)? as usize,
                        _ => self.le(8)? as usize,
                    };
                    let bytes = self.take(n)?.to_vec();
                    self.push(Slot::Value(Value::Bytes(bytes)));
                }
                b']' => self.push(Slot::List(Vec::new())),
                b')' => self.push(Slot::Tuple(Vec::new())),
                b'}' => self.push(Slot::Dict(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Slot::List(items));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Slot::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.malformed("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Slot::Tuple(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push(Slot::Dict(pairs));
                }
                b'a' => {
                    let item = self.pop()?;
                    self.extend_list(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.extend_dict(vec![(key, value)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.extend_dict(pairs)?;
                }
                b'q' | b'r' => {
                    let key = if op == b'q' { self.le(1)? } else { self.le(4)? };
                    let top = self.top()?;
                    self.memo.insert(key, top);
                }
                0x94 => {
                    let top = self.top()?;
                    let key = self.memo.len() as u64;
                    self.memo.insert(key, top);
                }
                b'p' => {
                    let key = self.line()?.parse().map_err(|_| self.malformed("PUT key"))?;
                    let top = self.top()?;
                    self.memo.insert(key, top);
                }
                b'h' | b'j' => {
                    let key = if op == b'h' { self.le(1)? } else { self.le(4)? };
                    let id = self.memo_get(key)?;
                    self.stack.push(id);
                }
                b'g' => {
                    let key = self.line()?.parse().map_err(|_| self.malformed("GET key"))?;
                    let id = self.memo_get(key)?;
                    self.stack.push(id);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.arena[module], &self.arena[name]) {
                        (Slot::Value(Value::Str(m)), Slot::Value(Value::Str(n))) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n)?;
                        }
                        _ => return Err(self.malformed("STACK_GLOBAL needs two strings")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_storage(pid)?;
                    self.push(storage);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let result = self.reduce(callable, args)?;
                    self.push(result);
                }
                b'b' => {
                    // BUILD sets object state. For an OrderedDict state dict that state is its
                    // `_metadata` (module versions): kept out, since nothing here needs it.
                    self.pop()?;
                    self.top()?;
                }
                b'i' | b'o' | 0x81 | 0x92 | 0x82..=0x84 | b'P' => {
                    let opcode = match op {
                        b'i' => "INST",
                        b'o' => "OBJ",
                        0x81 => "NEWOBJ",
                        0x92 => "NEWOBJ_EX",
                        b'P' => "PERSID",
                        _ => "EXT",
                    };
                    return Err(PickleError::ForbiddenOpcode { opcode: opcode.into(), position });
                }
                _ => return Err(PickleError::UnknownOpcode { opcode: op, position }),
            }
        }
    }

    fn pairs(&self, items: Vec<usize>) -> Result<Vec<(usize, usize)>, PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("odd number of dict items"));
        }
        Ok(items.chunks(2).map(|kv| (kv[0], kv[1])).collect())
    }

    fn extend_list(&mut self, items: Vec<usize>) -> Result<(), PickleError> {
        let top = self.top()?;
        match &mut self.arena[top] {
            Slot::List(list) => {
                list.extend(items);
                Ok(())
            }
            _ => Err(self.malformed("APPEND to a non-list")),
        }
    }

    fn extend_dict(&mut self, pairs: Vec<(usize, usize)>) -> Result<(), PickleError> {
        let top = self.top()?;
        match &mut self.arena[top] {
            Slot::Dict(dict) => {
                dict.extend(pairs);
                Ok(())
            }
            _ => Err(self.malformed("SETITEM on a non-dict")),
        }
    }

    fn tuple_items(&self, id: usize) -> Option<&[usize]> {
        match &self.arena[id] {
            Slot::Tuple(items) => Some(items),
            _ => None,
        }
    }

    fn int(&self, id: usize) -> Option<i64> {
        match &self.arena[id] {
            Slot::Value(Value::Int(v)) => Some(*v),
            _ => None,
        }
    }

    fn str(&self, id: usize) -> Option<&str> {
        match &self.arena[id] {
            Slot::Value(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// `('storage', torch.XStorage, key, location, numel)` → a storage reference.
    fn persistent_storage(&self, pid: usize) -> Result<Slot, PickleError> {
        let bad = || self.malformed("persistent id is not ('storage', type, key, location, numel)");
        let items = self.tuple_items(pid).ok_or_else(bad)?;
        let [tag, ty, key, _location, numel] = items else { return Err(bad()) };
        if self.str(*tag) != Some("storage") {
            return Err(bad());
        }
        let Slot::Global("torch", name) = self.arena[*ty] else { return Err(bad()) };
        let storage_type = StorageType::from_name(name).ok_or_else(bad)?;
        let key = self.str(*key).ok_or_else(bad)?.to_string();
        let numel = self.int(*numel).filter(|n| *n >= 0).ok_or_else(bad)? as usize;
        Ok(Slot::Storage(storage_type, key, numel))
    }

    fn int_tuple(&self, id: usize) -> Option<Vec<i64>> {
        self.tuple_items(id)?.iter().map(|&i| self.int(i)).collect()
    }

    fn reduce(&mut self, callable: usize, args: usize) -> Result<Slot, PickleError> {
        let Slot::Global(module, name) = self.arena[callable] else {
            return Err(self.malformed("REDUCE on something that is not an allowed callable"));
        };
        let args = self.tuple_items(args).ok_or_else(|| self.malformed("REDUCE arguments are not a tuple"))?.to_vec();
        match (module, name) {
            ("collections", "OrderedDict") if args.is_empty() => Ok(Slot::Dict(Vec::new())),
            ("torch._utils", "_rebuild_tensor_v2") => {
                let bad = || self.malformed("_rebuild_tensor_v2(storage, offset, size, stride, …) expected");
                let (storage, offset, size, stride) = match args.as_slice() {
                    [storage, offset, size, stride, ..] => (*storage, *offset, *size, *stride),
                    _ => return Err(bad()),
                };
                let Slot::Storage(storage_type, key, numel) = self.arena[storage].clone() else { return Err(bad()) };
                let offset = self.int(offset).filter(|o| *o >= 0).ok_or_else(bad)? as usize;
                let size = self.int_tuple(size).ok_or_else(bad)?;
                let stride = self.int_tuple(stride).ok_or_else(bad)?;
                if size.len() != stride.len() || size.iter().chain(&stride).any(|&d| d < 0) {
                    return Err(bad());
                }
                Ok(Slot::Value(Value::Tensor(TensorRef {
                    storage_key: key,
                    storage_type,
                    storage_numel: numel,
                    offset,
                    size,
                    stride,
                })))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => match args.first() {
                Some(&tensor) => Ok(self.arena[tensor].clone()),
                None => Err(self.malformed("_rebuild_parameter without a tensor")),
            },
            _ => Err(self.malformed(format!("`{module}.{name}` cannot be called with these arguments"))),
        }
    }

    /// Turns arena slot `id` into a plain value (depth-limited: pickles can be cyclic).
    fn resolve(&self, id: usize, depth: usize) -> Result<Value, PickleError> {
        if depth > 64 {
            return Err(self.malformed("nesting deeper than 64 (cyclic pickle?)"));
        }
        let items = |ids: &[usize]| ids.iter().map(|&i| self.resolve(i, depth + 1)).collect::<Result<Vec<_>, _>>();
        Ok(match &self.arena[id] {
            Slot::Value(v) => v.clone(),
            Slot::List(ids) => Value::List(items(ids)?),
            Slot::Tuple(ids) => Value::Tuple(items(ids)?),
            Slot::Dict(pairs) => Value::Dict(
                pairs
                    .iter()
                    .map(|&(k, v)| Ok((self.resolve(k, depth + 1)?, self.resolve(v, depth + 1)?)))
                    .collect::<Result<_, PickleError>>()?,
            ),
            Slot::Global(m, n) => return Err(self.malformed(format!("`{m}.{n}` left uncalled in the result"))),
            Slot::Storage(..) => return Err(self.malformed("a bare storage in the result")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_os_system_before_calling_anything() {
        // pickle.dumps of an object whose __reduce__ returns (os.system, ("echo pwned",)), protocol 2.
        let payload = b"\x80\x02cposix\nsystem\nq\x00X\n\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.";
        let err = load(payload).unwrap_err();
        assert!(
            matches!(err, PickleError::ForbiddenGlobal { ref module, ref name } if module == "posix" && name == "system"),
            "{err}"
        );
        assert!(err.to_string().contains("posix.system"));
    }

    #[test]
    fn refuses_stack_global_eval_and_object_opcodes() {
        // Protocol 4 STACK_GLOBAL builtins.eval.
        let payload = b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94.";
        assert!(matches!(load(payload), Err(PickleError::ForbiddenGlobal { .. })));
        assert!(matches!(load(b"\x80\x02(\x81."), Err(PickleError::ForbiddenOpcode { .. })));
    }

    #[test]
    fn decodes_plain_data_and_negative_longs() {
        // pickle.dumps({"a": [1, -2, 3.5, None, True], "b": (-(2**40), "猫")}, protocol=2)
        let payload = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00bq\x03\x8a\x06\x00\x00\x00\x00\x00\xffX\x03\x00\x00\x00\xe7\x8c\xabq\x04\x86q\x05u.";
        let value = load(payload).unwrap();
        assert_eq!(
            value.get("a"),
            Some(&Value::List(vec![Value::Int(1), Value::Int(-2), Value::Float(3.5), Value::None, Value::Bool(true)]))
        );
        assert_eq!(value.get("b"), Some(&Value::Tuple(vec![Value::Int(-(1 << 40)), Value::Str("猫".into())])));
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let payload = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff";
        for end in 0..payload.len() {
            assert!(load(&payload[..end]).is_err(), "prefix of {end} bytes");
        }
    }
}
