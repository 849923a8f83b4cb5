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
//!
//! The reader also bounds what it builds ([`Limits`]): a few hundred bytes of memo references
//! that double at every level ("billion laughs") would otherwise resolve into an exponential
//! tree. Objects created, memo entries, items per container, nesting depth and bytes
//! materialised — counting a shared value again each time the result holds another copy of it —
//! each have a budget; going over one is [`PickleError::Budget`], before the memory is taken.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::mem::size_of;

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
    /// Boxed, so that every value stays small (a result may hold millions).
    Tensor(Box<TensorRef>),
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

/// What the reader may build from one pickle (see [`load_with`]). Going over any of these is
/// [`PickleError::Budget`], so that whatever the input, the reader's memory stays within about
/// twice `max_bytes` (vectors grow by doubling), plus the memo and the stack, which
/// `max_memo` and `max_container_items` bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Objects created: every value the opcodes make, plus every value of the result (a value
    /// the pickle shares counts once per copy the result holds).
    pub max_objects: usize,
    /// Memo entries (`PUT`/`MEMOIZE`).
    pub max_memo: usize,
    /// Items in one list, tuple or dict (dict entries count once), and on the stack.
    pub max_container_items: usize,
    /// Nesting depth of the result (containers in containers), and of unclosed `MARK`s.
    pub max_depth: usize,
    /// Bytes materialised: strings, bytes, tensor shapes, container slots and the values
    /// themselves, while parsing and again for each copy in the result.
    pub max_bytes: usize,
}

impl Limits {
    /// For `torch.save` checkpoints. The largest real cn_clip file, a ViT-H-14 training
    /// checkpoint with its AdamW state (783 parameters, 3,132 tensors, a 348 KB pickle), takes
    /// ~58,000 objects, ~23,000 memo entries, 783 items in its largest container, depth 5 and
    /// ~3.3 MB; the released ViT-H-14 (no optimizer) under a third of that. These limits leave
    /// it a margin of 12× (depth), 20× (bytes), 36× (objects), 45× (memo) and 1,300× (items),
    /// and keep the reader under ~250 MiB whatever the input.
    pub const CHECKPOINT: Limits = Limits {
        max_objects: 2 << 20,
        max_memo: 1 << 20,
        max_container_items: 1 << 20,
        max_depth: 64,
        max_bytes: 64 << 20,
    };

    /// For one record, as cn_clip's LMDB `pairs` values (`(image_id, text_id, text)`: 8 objects,
    /// 3 items, depth 1): room for a caption of ~16 MiB, and at most ~32 MiB of memory.
    pub const RECORD: Limits = Limits {
        max_objects: 1 << 12,
        max_memo: 1 << 12,
        max_container_items: 1 << 12,
        max_depth: 16,
        max_bytes: 32 << 20,
    };
}

/// The environment variable that raises every budget: `CNCLIP_PICKLE_LIMIT_SCALE=4` allows
/// four times as much of each (for a file that really needs it; a hostile one still stops).
pub const SCALE_VAR: &str = "CNCLIP_PICKLE_LIMIT_SCALE";

impl Limits {
    /// Every budget multiplied by `factor` (saturating).
    pub fn scaled(self, factor: usize) -> Limits {
        Limits {
            max_objects: self.max_objects.saturating_mul(factor),
            max_memo: self.max_memo.saturating_mul(factor),
            max_container_items: self.max_container_items.saturating_mul(factor),
            max_depth: self.max_depth.saturating_mul(factor),
            max_bytes: self.max_bytes.saturating_mul(factor),
        }
    }

    /// These limits scaled by [`SCALE_VAR`] when it holds a whole number ≥ 1 (as they are when
    /// it is unset or holds anything else).
    pub fn from_env(self) -> Limits {
        match std::env::var(SCALE_VAR).ok().and_then(|v| v.trim().parse::<usize>().ok()) {
            Some(factor) if factor >= 1 => self.scaled(factor),
            _ => self,
        }
    }
}

impl Default for Limits {
    /// [`Limits::CHECKPOINT`].
    fn default() -> Self {
        Limits::CHECKPOINT
    }
}

/// Which of the [`Limits`] a pickle went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Objects,
    Memo,
    ContainerItems,
    Depth,
    Bytes,
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Budget::Objects => "objects created (max_objects)",
            Budget::Memo => "memo entries (max_memo)",
            Budget::ContainerItems => "items in one container (max_container_items)",
            Budget::Depth => "levels of nesting (max_depth)",
            Budget::Bytes => "bytes materialised (max_bytes)",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error(
        "refusing to load: the pickle goes over the reader's budget of {limit} {budget}, far more than any real cn_clip file needs (a hostile or corrupt pickle? if the file is trusted, {SCALE_VAR}=N raises every budget N×)"
    )]
    Budget { budget: Budget, limit: usize },
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

/// A persistent storage reference, `('storage', type, key, location, numel)`.
#[derive(Debug, Clone)]
struct StorageRef {
    storage_type: StorageType,
    key: String,
    numel: usize,
}

/// Arena slots: finished values, or callables/markers that only exist while parsing. Kept as
/// small as a `Value` (32 bytes): a pickle of a few megabytes can make millions.
#[derive(Debug, Clone)]
enum Slot {
    Value(Value),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    /// `(module, name)`, an entry of [`ALLOWED_GLOBALS`].
    Global(&'static (&'static str, &'static str)),
    Storage(Box<StorageRef>),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    arena: Vec<Slot>,
    stack: Vec<usize>,
    marks: Vec<usize>,
    memo: BTreeMap<u64, usize>,
    limits: Limits,
    /// Objects and bytes spent so far (cells: `resolve` walks the arena by shared reference).
    objects: Cell<usize>,
    bytes: Cell<usize>,
}

/// Decodes a pickle into plain data, within [`Limits::CHECKPOINT`].
///
/// # Errors
/// [`PickleError::ForbiddenGlobal`] / [`PickleError::ForbiddenOpcode`] for anything that would
/// run code, [`PickleError::Budget`] for a pickle that would build more than the limits allow,
/// and [`PickleError::Malformed`] / [`PickleError::UnknownOpcode`] for broken input.
pub fn load(data: &[u8]) -> Result<Value, PickleError> {
    load_with(data, &Limits::default())
}

/// Decodes a pickle into plain data, within `limits`.
///
/// # Errors
/// As [`load`]; [`PickleError::Budget`] names the first budget the pickle went over.
pub fn load_with(data: &[u8], limits: &Limits) -> Result<Value, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: BTreeMap::new(),
        limits: *limits,
        objects: Cell::new(0),
        bytes: Cell::new(0),
    };
    let top = m.run()?;
    m.spend_bytes(size_of::<Value>())?;
    m.resolve(top, 0)
}

/// Heap bytes a (boxed) tensor reference owns.
fn tensor_heap(t: &TensorRef) -> usize {
    size_of::<TensorRef>() + t.storage_key.len() + (t.size.len() + t.stride.len()) * size_of::<i64>()
}

/// Heap bytes a scalar value owns (containers never sit in a `Slot::Value`).
fn heap_bytes(value: &Value) -> usize {
    match value {
        Value::Str(s) => s.len(),
        Value::Bytes(b) => b.len(),
        Value::Tensor(t) => tensor_heap(t),
        _ => 0,
    }
}

/// The entry of [`ALLOWED_GLOBALS`] for `module.name`.
fn allowed_global(module: &str, name: &str) -> Result<&'static (&'static str, &'static str), PickleError> {
    ALLOWED_GLOBALS
        .iter()
        .find(|(m, n)| *m == module && *n == name)
        .ok_or_else(|| PickleError::ForbiddenGlobal { module: module.into(), name: name.into() })
}

impl<'a> Machine<'a> {
    fn malformed(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Malformed { position: self.pos, reason: reason.into() }
    }

    fn over(budget: Budget, limit: usize) -> PickleError {
        PickleError::Budget { budget, limit }
    }

    fn spend_objects(&self, n: usize) -> Result<(), PickleError> {
        let total = self.objects.get().saturating_add(n);
        self.objects.set(total);
        if total > self.limits.max_objects {
            return Err(Self::over(Budget::Objects, self.limits.max_objects));
        }
        Ok(())
    }

    fn spend_bytes(&self, n: usize) -> Result<(), PickleError> {
        let total = self.bytes.get().saturating_add(n);
        self.bytes.set(total);
        if total > self.limits.max_bytes {
            return Err(Self::over(Budget::Bytes, self.limits.max_bytes));
        }
        Ok(())
    }

    fn check_items(&self, n: usize) -> Result<(), PickleError> {
        if n > self.limits.max_container_items {
            return Err(Self::over(Budget::ContainerItems, self.limits.max_container_items));
        }
        Ok(())
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

    /// `n` bytes of the input, once they fit in the byte budget.
    fn take_counted(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let bytes = self.take(n)?;
        self.spend_bytes(n)?;
        Ok(bytes)
    }

    fn utf8(&mut self, n: usize) -> Result<String, PickleError> {
        let bytes = self.take_counted(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.malformed("string is not UTF-8"))
    }

    /// Stores `slot` in the arena, counting it (and, for containers, their item slots) against
    /// the budgets. Strings, bytes, keys and shapes were counted by whoever made them, before.
    fn alloc(&mut self, slot: Slot) -> Result<usize, PickleError> {
        self.spend_objects(1)?;
        let heap = match &slot {
            Slot::List(items) | Slot::Tuple(items) => {
                self.check_items(items.len())?;
                items.len() * size_of::<usize>()
            }
            Slot::Dict(pairs) => {
                self.check_items(pairs.len())?;
                pairs.len() * size_of::<(usize, usize)>()
            }
            Slot::Value(_) | Slot::Global(..) | Slot::Storage(..) => 0,
        };
        self.spend_bytes(size_of::<Slot>() + heap)?;
        self.arena.push(slot);
        Ok(self.arena.len() - 1)
    }

    fn push_ref(&mut self, id: usize) -> Result<(), PickleError> {
        self.check_items(self.stack.len() + 1)?;
        self.stack.push(id);
        Ok(())
    }

    fn push(&mut self, slot: Slot) -> Result<(), PickleError> {
        let id = self.alloc(slot)?;
        self.push_ref(id)
    }

    fn pop(&mut self) -> Result<usize, PickleError> {
        self.stack.pop().ok_or_else(|| self.malformed("stack underflow"))
    }

    fn top(&self) -> Result<usize, PickleError> {
        self.stack.last().copied().ok_or_else(|| self.malformed("empty stack"))
    }

    fn push_mark(&mut self) -> Result<(), PickleError> {
        if self.marks.len() >= self.limits.max_depth {
            return Err(Self::over(Budget::Depth, self.limits.max_depth));
        }
        self.marks.push(self.stack.len());
        Ok(())
    }

    fn pop_mark(&mut self) -> Result<Vec<usize>, PickleError> {
        let mark = self.marks.pop().ok_or_else(|| self.malformed("no MARK"))?;
        if mark > self.stack.len() {
            return Err(self.malformed("MARK above the stack"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        let global = allowed_global(module, name)?;
        self.push(Slot::Global(global))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let top = self.top()?;
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&key) {
            return Err(Self::over(Budget::Memo, self.limits.max_memo));
        }
        self.memo.insert(key, top);
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
                b'(' => self.push_mark()?,
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.push_ref(top)?;
                }
                b'N' => self.push(Slot::Value(Value::None))?,
                0x88 => self.push(Slot::Value(Value::Bool(true)))?,
                0x89 => self.push(Slot::Value(Value::Bool(false)))?,
                b'J' => {
                    let v = self.le(4)? as u32 as i32 as i64;
                    self.push(Slot::Value(Value::Int(v)))?;
                }
                b'K' => {
                    let v = self.le(1)? as i64;
                    self.push(Slot::Value(Value::Int(v)))?;
                }
                b'M' => {
                    let v = self.le(2)? as i64;
                    self.push(Slot::Value(Value::Int(v)))?;
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
                    self.push(Slot::Value(Value::Int(v)))?;
                }
                b'G' => {
                    let bytes: [u8; 8] = self.take(8)?.try_into().expect("8 bytes");
                    self.push(Slot::Value(Value::Float(f64::from_be_bytes(bytes))))?;
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => self.u8()? as usize,
                        b'X' => self.le(4)? as usize,
                        _ => self.le(8)? as usize,
                    };
                    let s = self.utf8(n)?;
                    self.push(Slot::Value(Value::Str(s)))?;
                }
                b'C' | b'B' | 0x8e | b'U' | b'T' => {
                    let n = match op {
                        b'C' | b'U' => self.u8()? as usize,
                        b'B' | b'T' => self.le(4)? as usize,
                        _ => self.le(8)? as usize,
                    };
                    let bytes = self.take_counted(n)?.to_vec();
                    self.push(Slot::Value(Value::Bytes(bytes)))?;
                }
                b']' => self.push(Slot::List(Vec::new()))?,
                b')' => self.push(Slot::Tuple(Vec::new()))?,
                b'}' => self.push(Slot::Dict(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Slot::List(items))?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Slot::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.malformed("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Slot::Tuple(items))?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push(Slot::Dict(pairs))?;
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
                    self.memo_put(key)?;
                }
                0x94 => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?;
                }
                b'p' => {
                    let key = self.line()?.parse().map_err(|_| self.malformed("PUT key"))?;
                    self.memo_put(key)?;
                }
                b'h' | b'j' => {
                    let key = if op == b'h' { self.le(1)? } else { self.le(4)? };
                    let id = self.memo_get(key)?;
                    self.push_ref(id)?;
                }
                b'g' => {
                    let key = self.line()?.parse().map_err(|_| self.malformed("GET key"))?;
                    let id = self.memo_get(key)?;
                    self.push_ref(id)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let global = match (&self.arena[module], &self.arena[name]) {
                        (Slot::Value(Value::Str(m)), Slot::Value(Value::Str(n))) => allowed_global(m, n)?,
                        _ => return Err(self.malformed("STACK_GLOBAL needs two strings")),
                    };
                    self.push(Slot::Global(global))?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_storage(pid)?;
                    self.push(storage)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let result = self.reduce(callable, args)?;
                    self.push(result)?;
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
        let len = match &self.arena[top] {
            Slot::List(list) => list.len(),
            _ => return Err(self.malformed("APPEND to a non-list")),
        };
        self.check_items(len + items.len())?;
        self.spend_bytes(items.len() * size_of::<usize>())?;
        if let Slot::List(list) = &mut self.arena[top] {
            list.extend(items);
        }
        Ok(())
    }

    fn extend_dict(&mut self, pairs: Vec<(usize, usize)>) -> Result<(), PickleError> {
        let top = self.top()?;
        let len = match &self.arena[top] {
            Slot::Dict(dict) => dict.len(),
            _ => return Err(self.malformed("SETITEM on a non-dict")),
        };
        self.check_items(len + pairs.len())?;
        self.spend_bytes(pairs.len() * size_of::<(usize, usize)>())?;
        if let Slot::Dict(dict) = &mut self.arena[top] {
            dict.extend(pairs);
        }
        Ok(())
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
        let Slot::Global(("torch", name)) = self.arena[*ty] else { return Err(bad()) };
        let storage_type = StorageType::from_name(name).ok_or_else(bad)?;
        let key = self.str(*key).ok_or_else(bad)?;
        self.spend_bytes(size_of::<StorageRef>() + key.len())?;
        let key = key.to_string();
        let numel = self.int(*numel).filter(|n| *n >= 0).ok_or_else(bad)? as usize;
        Ok(Slot::Storage(Box::new(StorageRef { storage_type, key, numel })))
    }

    fn int_tuple(&self, id: usize) -> Option<Vec<i64>> {
        self.tuple_items(id)?.iter().map(|&i| self.int(i)).collect()
    }

    /// Calls an allowed callable. What it builds is counted by `alloc` once pushed; copies made
    /// here (storage keys, shapes) are counted before they are made, so a key or shape shared by
    /// many calls costs once per call.
    fn reduce(&self, callable: usize, args: usize) -> Result<Slot, PickleError> {
        let Slot::Global(&(module, name)) = self.arena[callable] else {
            return Err(self.malformed("REDUCE on something that is not an allowed callable"));
        };
        let args = self.tuple_items(args).ok_or_else(|| self.malformed("REDUCE arguments are not a tuple"))?;
        match (module, name) {
            ("collections", "OrderedDict") if args.is_empty() => Ok(Slot::Dict(Vec::new())),
            ("torch._utils", "_rebuild_tensor_v2") => {
                let bad = || self.malformed("_rebuild_tensor_v2(storage, offset, size, stride, …) expected");
                let (storage, offset, size, stride) = match args {
                    [storage, offset, size, stride, ..] => (*storage, *offset, *size, *stride),
                    _ => return Err(bad()),
                };
                let Slot::Storage(storage) = &self.arena[storage] else { return Err(bad()) };
                let dims = self.tuple_items(size).map_or(0, <[usize]>::len)
                    + self.tuple_items(stride).map_or(0, <[usize]>::len);
                self.spend_bytes(size_of::<TensorRef>() + storage.key.len() + dims * size_of::<i64>())?;
                let offset = self.int(offset).filter(|o| *o >= 0).ok_or_else(bad)? as usize;
                let size = self.int_tuple(size).ok_or_else(bad)?;
                let stride = self.int_tuple(stride).ok_or_else(bad)?;
                if size.len() != stride.len() || size.iter().chain(&stride).any(|&d| d < 0) {
                    return Err(bad());
                }
                Ok(Slot::Value(Value::Tensor(Box::new(TensorRef {
                    storage_key: storage.key.clone(),
                    storage_type: storage.storage_type,
                    storage_numel: storage.numel,
                    offset,
                    size,
                    stride,
                }))))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => match args.first() {
                Some(&tensor) => match &self.arena[tensor] {
                    Slot::Value(Value::Tensor(t)) => {
                        self.spend_bytes(tensor_heap(t))?;
                        Ok(Slot::Value(Value::Tensor(t.clone())))
                    }
                    _ => Err(self.malformed("_rebuild_parameter of something that is not a tensor")),
                },
                None => Err(self.malformed("_rebuild_parameter without a tensor")),
            },
            _ => Err(self.malformed(format!("`{module}.{name}` cannot be called with these arguments"))),
        }
    }

    /// Turns arena slot `id` into a plain value. Every value made counts as an object, and its
    /// bytes (a container's item slots before they are allocated, a string's before it is
    /// copied) against the byte budget: a slot the pickle shares is counted each time.
    fn resolve(&self, id: usize, depth: usize) -> Result<Value, PickleError> {
        if depth > self.limits.max_depth {
            return Err(Self::over(Budget::Depth, self.limits.max_depth));
        }
        self.spend_objects(1)?;
        let items = |ids: &[usize]| -> Result<Vec<Value>, PickleError> {
            self.spend_bytes(ids.len() * size_of::<Value>())?;
            let mut values = Vec::with_capacity(ids.len());
            for &i in ids {
                values.push(self.resolve(i, depth + 1)?);
            }
            Ok(values)
        };
        Ok(match &self.arena[id] {
            Slot::Value(v) => {
                self.spend_bytes(heap_bytes(v))?;
                v.clone()
            }
            Slot::List(ids) => Value::List(items(ids)?),
            Slot::Tuple(ids) => Value::Tuple(items(ids)?),
            Slot::Dict(pairs) => {
                self.spend_bytes(pairs.len() * size_of::<(Value, Value)>())?;
                let mut entries = Vec::with_capacity(pairs.len());
                for &(k, v) in pairs {
                    entries.push((self.resolve(k, depth + 1)?, self.resolve(v, depth + 1)?));
                }
                Value::Dict(entries)
            }
            Slot::Global((m, n)) => return Err(self.malformed(format!("`{m}.{n}` left uncalled in the result"))),
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

    /// Hand-assembled pickles, opcode by opcode.
    #[derive(Default)]
    struct Pickle(Vec<u8>, u32);

    impl Pickle {
        fn proto(n: u8) -> Self {
            Pickle(vec![0x80, n], 0)
        }
        /// PUTs the top under the next memo key, and returns it.
        fn memoize(&mut self) -> u32 {
            self.1 += 1;
            self.put(self.1 - 1);
            self.1 - 1
        }
        /// The first time, `write` then memoize it (into `key`); afterwards, GET it.
        fn once(&mut self, key: &mut Option<u32>, write: impl FnOnce(&mut Self)) {
            match *key {
                Some(k) => {
                    self.get(k);
                }
                None => {
                    write(self);
                    *key = Some(self.memoize());
                }
            }
        }
        fn op(&mut self, ops: &[u8]) -> &mut Self {
            self.0.extend_from_slice(ops);
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.op(b"X").op(&(s.len() as u32).to_le_bytes()).op(s.as_bytes())
        }
        fn int(&mut self, v: i32) -> &mut Self {
            self.op(b"J").op(&v.to_le_bytes())
        }
        fn put(&mut self, key: u32) -> &mut Self {
            self.op(b"r").op(&key.to_le_bytes())
        }
        fn get(&mut self, key: u32) -> &mut Self {
            self.op(b"j").op(&key.to_le_bytes())
        }
        fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(b"c").op(module.as_bytes()).op(b"\n").op(name.as_bytes()).op(b"\n")
        }
        fn stop(&mut self) -> Vec<u8> {
            self.op(b".");
            std::mem::take(&mut self.0)
        }
    }

    /// "Billion laughs": level `i + 1` is the tuple `(level i, level i)`, both memo references,
    /// so the result of `levels` levels holds 2^levels copies of the empty list at the bottom.
    fn billion_laughs(levels: u8) -> Vec<u8> {
        let mut p = Pickle::proto(4);
        p.op(&[b']', 0x94]); // EMPTY_LIST, MEMOIZE (key 0)
        for i in 0..levels {
            p.op(&[b'h', i, b'h', i, 0x86, 0x94, b'0']); // GET i, GET i, TUPLE2, MEMOIZE (i + 1), POP
        }
        p.op(&[b'h', levels]).stop()
    }

    fn budget_of(result: Result<Value, PickleError>) -> (Budget, usize) {
        match result {
            Err(PickleError::Budget { budget, limit }) => (budget, limit),
            other => panic!("expected a budget error, got {other:?}"),
        }
    }

    #[test]
    fn billion_laughs_is_refused_by_the_byte_budget_quickly() {
        let payload = billion_laughs(40);
        assert!(payload.len() < 300, "{} bytes", payload.len());
        let start = std::time::Instant::now();
        let err = load(&payload).unwrap_err();
        let elapsed = start.elapsed();
        assert!(
            matches!(err, PickleError::Budget { budget: Budget::Bytes, limit } if limit == Limits::CHECKPOINT.max_bytes),
            "{err}"
        );
        assert!(err.to_string().contains("bytes materialised (max_bytes)"), "{err}");
        // Debug build on a busy machine: well under a second in practice.
        assert!(elapsed < std::time::Duration::from_secs(20), "took {elapsed:?}");
        // Per-record limits (LMDB pairs) stop it at depth 16, or after a few thousand objects.
        assert_eq!(budget_of(load_with(&payload, &Limits::RECORD)), (Budget::Depth, Limits::RECORD.max_depth));
        let shallow = billion_laughs(14);
        assert_eq!(budget_of(load_with(&shallow, &Limits::RECORD)), (Budget::Objects, Limits::RECORD.max_objects));
        // A few levels are harmless, and come out as the tree they describe.
        let small = load(&billion_laughs(2)).unwrap();
        let one = Value::Tuple(vec![Value::List(vec![]), Value::List(vec![])]);
        assert_eq!(small, Value::Tuple(vec![one.clone(), one]));
    }

    #[test]
    fn a_list_holding_itself_is_refused_by_the_depth_budget() {
        // l = []; l.append(l); l.append(l)
        let payload = Pickle::proto(2).op(b"]").put(0).op(b"(").get(0).get(0).op(b"e").stop();
        assert_eq!(budget_of(load(&payload)), (Budget::Depth, 64));
    }

    #[test]
    fn each_budget_trips_on_its_own() {
        let generous = Limits {
            max_objects: 1 << 20,
            max_memo: 1 << 20,
            max_container_items: 1 << 20,
            max_depth: 64,
            max_bytes: 1 << 30,
        };

        // Objects: a list of 20 Nones is 21 objects, and 42 once resolved.
        let mut p = Pickle::proto(2);
        p.op(b"](");
        for _ in 0..20 {
            p.op(b"N");
        }
        let list = p.op(b"e").stop();
        assert!(load_with(&list, &Limits { max_objects: 42, ..generous }).is_ok());
        assert_eq!(budget_of(load_with(&list, &Limits { max_objects: 41, ..generous })), (Budget::Objects, 41));
        assert_eq!(budget_of(load_with(&list, &Limits { max_objects: 10, ..generous })), (Budget::Objects, 10));

        // Memo: 300 entries (MEMOIZE, as protocol 4 writes) against 100 allowed, even though
        // they all name one object.
        let mut p = Pickle::proto(4);
        p.op(b"N");
        for _ in 0..300 {
            p.op(&[0x94]);
        }
        let memo = p.stop();
        assert!(load_with(&memo, &Limits { max_memo: 300, ..generous }).is_ok());
        assert_eq!(budget_of(load_with(&memo, &Limits { max_memo: 100, ..generous })), (Budget::Memo, 100));

        // Container items: a list grown by APPENDS batches of 50; a dict by SETITEMS; the stack.
        let mut p = Pickle::proto(2);
        p.op(b"]");
        for _ in 0..4 {
            p.op(b"(");
            for i in 0..50 {
                p.int(i);
            }
            p.op(b"e");
        }
        let list = p.stop();
        assert!(load_with(&list, &Limits { max_container_items: 200, ..generous }).is_ok());
        let items = Limits { max_container_items: 100, ..generous };
        assert_eq!(budget_of(load_with(&list, &items)), (Budget::ContainerItems, 100));
        let mut p = Pickle::proto(2);
        p.op(b"}(");
        for i in 0..101 {
            p.int(i).op(b"N");
        }
        let dict = p.op(b"u").stop();
        assert_eq!(
            budget_of(load_with(&dict, &Limits { max_container_items: 200, ..items })),
            (Budget::ContainerItems, 200)
        );
        let mut p = Pickle::proto(2);
        p.op(b"N");
        for _ in 0..150 {
            p.op(b"2"); // DUP: references, no new objects
        }
        assert_eq!(budget_of(load_with(&p.stop(), &items)), (Budget::ContainerItems, 100));

        // Depth: ten lists, each appended to the one before: nine levels below the top.
        let mut p = Pickle::proto(2);
        for _ in 0..10 {
            p.op(b"]");
        }
        for _ in 0..9 {
            p.op(b"a");
        }
        let nested = p.stop();
        assert!(load_with(&nested, &Limits { max_depth: 9, ..generous }).is_ok());
        assert_eq!(budget_of(load_with(&nested, &Limits { max_depth: 8, ..generous })), (Budget::Depth, 8));
        // … and unclosed MARKs.
        let mut p = Pickle::proto(2);
        for _ in 0..100 {
            p.op(b"(");
        }
        assert_eq!(budget_of(load(&p.op(b"N").stop())), (Budget::Depth, 64));

        // Bytes: a string longer than the budget.
        let long = Pickle::proto(2).str(&"x".repeat(1000)).stop();
        assert_eq!(budget_of(load_with(&long, &Limits { max_bytes: 500, ..generous })), (Budget::Bytes, 500));
    }

    #[test]
    fn a_shared_value_counts_each_time_the_result_holds_it() {
        // s = "x" * 1000; [s] * 100: ~2 KB to parse, ~110 KB once resolved.
        let mut p = Pickle::proto(2);
        p.op(b"]").str(&"x".repeat(1000)).put(0).op(b"0").op(b"(");
        for _ in 0..100 {
            p.get(0);
        }
        let shared = p.op(b"e").stop();
        assert!(shared.len() < 1600);
        let limits = |max_bytes| Limits { max_bytes, ..Limits::CHECKPOINT };
        assert!(load_with(&shared, &limits(120_000)).is_ok());
        assert_eq!(budget_of(load_with(&shared, &limits(50_000))), (Budget::Bytes, 50_000));
        // The parse alone fits in 50 KB: it is resolving the copies that does not.
        let single = Pickle::proto(2).op(b"]").str(&"x".repeat(1000)).put(0).op(b"0(").get(0).op(b"e").stop();
        assert!(load_with(&single, &limits(50_000)).is_ok());
    }

    /// A state dict as `torch.save` (protocol 2) writes it: an `OrderedDict` of `n` tensors
    /// (`_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())`), its
    /// items in SETITEMS batches of 1000, then its `_metadata` through BUILD; strings and
    /// callables memoised and referenced again.
    fn state_dict_pickle(n: u32) -> Vec<u8> {
        let mut p = Pickle::proto(2);
        p.op(b"}").memoize();
        p.op(b"(").str("epoch").int(10).str("state_dict");
        let ordered_dict = p.global("collections", "OrderedDict").memoize();
        p.op(b")R").memoize();
        let (mut rebuild, mut storage, mut half, mut cpu) = (None, None, None, None);
        for i in 0..n {
            if i % 1000 == 0 {
                p.op(if i > 0 { b"u(" } else { b"(" });
            }
            p.str(&format!("module.visual.transformer.resblocks.{}.mlp.c_fc.weight", i / 12)).memoize();
            p.once(&mut rebuild, |p| {
                p.global("torch._utils", "_rebuild_tensor_v2");
            });
            p.op(b"((");
            p.once(&mut storage, |p| {
                p.str("storage");
            });
            p.once(&mut half, |p| {
                p.global("torch", "HalfStorage");
            });
            p.str(&i.to_string()).memoize();
            p.once(&mut cpu, |p| {
                p.str("cpu");
            });
            p.int(1280 * 5120).op(b"t").memoize();
            p.op(b"QK\x00").int(5120).int(1280).op(&[0x86]).memoize(); // storage, offset, size
            p.int(1280).op(b"K\x01").op(&[0x86]).memoize(); // stride
            p.op(&[0x89]).get(ordered_dict).op(b")R").memoize(); // requires_grad, backward hooks
            p.op(b"tR").memoize();
        }
        p.op(b"u");
        // _metadata: {"module.layer0": {"version": 1}, …}
        p.op(b"}(").str("_metadata").get(ordered_dict).op(b")R(");
        for i in 0..n / 4 {
            p.str(&format!("module.layer{i}")).op(b"}(").str("version").op(b"K\x01u");
        }
        p.op(b"uubu").stop() // metadata items, state, BUILD, the top-level items
    }

    #[test]
    fn a_state_dict_and_a_pairs_value_load_within_the_defaults() {
        let n = 4000; // more tensors than a ViT-H-14 checkpoint with its optimizer state holds
        let value = load(&state_dict_pickle(n)).unwrap();
        assert_eq!(value.get("epoch"), Some(&Value::Int(10)));
        let Some(Value::Dict(tensors)) = value.get("state_dict") else { panic!("no state dict") };
        assert_eq!(tensors.len(), n as usize);
        let Value::Tensor(t) = &tensors[3999].1 else { panic!("not a tensor") };
        assert_eq!((t.storage_key.as_str(), t.storage_type, t.storage_numel), ("3999", StorageType::Half, 1280 * 5120));
        assert_eq!((t.size.as_slice(), t.stride.as_slice()), (&[5120, 1280][..], &[1280, 1][..]));

        // pickle.dumps((1000, 3, "一只猫 cat")), as Python writes cn_clip's pairs values.
        let pair = b"\x80\x04\x95\x18\x00\x00\x00\x00\x00\x00\x00M\xe8\x03K\x03\x8c\r\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c\xab cat\x94\x87\x94.";
        let expected = Value::Tuple(vec![Value::Int(1000), Value::Int(3), Value::Str("一只猫 cat".into())]);
        assert_eq!(load_with(pair, &Limits::RECORD).unwrap(), expected);
        let caption = "猫".repeat(1 << 20); // a 3 MiB caption
        let long = Pickle::proto(2).int(1).int(2).str(&caption).op(&[0x87]).stop();
        assert!(load_with(&long, &Limits::RECORD).is_ok());
    }
}
