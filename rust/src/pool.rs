//! Expert pool: exact-size host arenas (page-locked on CUDA) holding one record per expert, the
//! expert table (layer, expert, tensor) -> (arena, offset, nbytes), and safetensors streaming
//! (pread straight into the pool: never a second copy of the bytes in RAM).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::RwLock;

use crate::device::SharedDevice;
use crate::error::{try_vec, Error, Result};
use crate::policy::Key;

/// Each tensor starts at a multiple of this inside a record; records are padded to it too.
pub const TENSOR_ALIGN: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub offset: usize,
    pub nbytes: usize,
}

/// Byte layout of one expert record.
#[derive(Clone, Debug)]
pub struct RecordLayout {
    pub tensors: Vec<TensorSpec>,
    pub record_nbytes: usize,
}

fn align_up(n: usize, a: usize) -> Option<usize> {
    n.checked_add(a - 1).map(|v| v / a * a)
}

impl RecordLayout {
    pub fn new(tensors: &[(String, i64)]) -> Result<Self> {
        if tensors.is_empty() {
            return Err(Error::InvalidArgument("layout must name at least one tensor".into()));
        }
        let mut out = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        for (name, nbytes) in tensors {
            if name.is_empty() {
                return Err(Error::InvalidArgument("layout tensor names must be non-empty".into()));
            }
            if out.iter().any(|t: &TensorSpec| &t.name == name) {
                return Err(Error::InvalidArgument(format!("layout names tensor {name:?} twice")));
            }
            if *nbytes <= 0 {
                return Err(Error::InvalidArgument(format!(
                    "layout tensor {name:?} has {nbytes} bytes; sizes must be > 0"
                )));
            }
            let nbytes = *nbytes as usize;
            out.push(TensorSpec { name: name.clone(), offset, nbytes });
            offset = offset
                .checked_add(nbytes)
                .and_then(|e| align_up(e, TENSOR_ALIGN))
                .ok_or_else(|| Error::InvalidArgument("layout is too large".into()))?;
        }
        Ok(Self { tensors: out, record_nbytes: offset })
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.tensors.iter().map(|t| t.name.as_str()).collect();
            Error::UnknownExpert(format!("unknown tensor {name:?}; the layout has {names:?}"))
        })
    }
}

struct Arena {
    addr: usize,
    bytes: usize,
}

pub struct ExpertPool {
    device: SharedDevice,
    layout: RecordLayout,
    keys: Vec<Key>,
    index: HashMap<Key, usize>,
    records_per_arena: usize,
    /// None once closed. Readers hold the read lock while they touch pool memory.
    arenas: RwLock<Option<Vec<Arena>>>,
    /// Open caches reading from this pool; close is refused while > 0.
    users: AtomicUsize,
}

/// One safetensors copy: (file tensor, layer, expert, pool tensor, src_offset, nbytes, dst_offset).
pub type LoadEntry = (String, i64, i64, String, i64, i64, i64);

impl ExpertPool {
    pub fn new(device: SharedDevice, layout: &[(String, i64)], keys: &[(i64, i64)], arena_bytes: i64) -> Result<Self> {
        let layout = RecordLayout::new(layout)?;
        let rec = layout.record_nbytes;
        if arena_bytes < rec as i64 {
            return Err(Error::InvalidArgument(format!(
                "arena_bytes ({arena_bytes}) must be >= one expert record ({rec} bytes)"
            )));
        }
        let mut index = HashMap::new();
        index.try_reserve(keys.len()).map_err(|e| {
            Error::OutOfMemory(format!("cannot allocate the expert table ({} experts): {e}", keys.len()))
        })?;
        let mut key_list = try_vec(keys.len(), "the expert list")?;
        for &(l, e) in keys {
            if l < 0 || e < 0 {
                return Err(Error::InvalidArgument(format!("keys must be non-negative, got ({l}, {e})")));
            }
            let k = (l as u64, e as u64);
            if index.insert(k, key_list.len()).is_some() {
                return Err(Error::InvalidArgument(format!("key ({l}, {e}) is listed twice")));
            }
            key_list.push(k);
        }
        let records_per_arena = (arena_bytes as usize / rec).max(1);
        let mut arenas = Vec::new();
        let mut left = key_list.len();
        while left > 0 {
            let n = left.min(records_per_arena);
            let bytes = n * rec;
            match device.alloc_pool(bytes) {
                Ok(addr) => arenas.push(Arena { addr, bytes }),
                Err(e) => {
                    for a in &arenas {
                        device.free_pool(a.addr, a.bytes);
                    }
                    return Err(e);
                }
            }
            left -= n;
        }
        Ok(Self {
            device,
            layout,
            keys: key_list,
            index,
            records_per_arena,
            arenas: RwLock::new(Some(arenas)),
            users: AtomicUsize::new(0),
        })
    }

    pub fn device(&self) -> &SharedDevice {
        &self.device
    }
    pub fn layout(&self) -> &RecordLayout {
        &self.layout
    }
    pub fn record_nbytes(&self) -> usize {
        self.layout.record_nbytes
    }
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }
    pub fn contains(&self, key: Key) -> bool {
        self.index.contains_key(&key)
    }
    pub fn num_arenas(&self) -> usize {
        self.arenas.read().as_ref().map_or(0, |a| a.len())
    }
    pub fn allocated_bytes(&self) -> usize {
        self.arenas.read().as_ref().map_or(0, |a| a.iter().map(|x| x.bytes).sum())
    }
    pub fn is_closed(&self) -> bool {
        self.arenas.read().is_none()
    }

    fn closed_err() -> Error {
        Error::Closed("the expert pool is closed".into())
    }

    pub fn check_key(&self, key: Key) -> Result<usize> {
        self.index.get(&key).copied().ok_or_else(|| {
            Error::UnknownExpert(format!(
                "the pool holds no expert (layer={}, expert={}); it holds {} experts",
                key.0,
                key.1,
                self.keys.len()
            ))
        })
    }

    /// Validate a Python-side (layer, expert) pair.
    pub fn key_from(&self, layer: i64, expert: i64) -> Result<Key> {
        if layer < 0 || expert < 0 {
            return Err(Error::UnknownExpert(format!(
                "layer and expert must be non-negative, got (layer={layer}, expert={expert})"
            )));
        }
        let k = (layer as u64, expert as u64);
        self.check_key(k)?;
        Ok(k)
    }

    fn addr_in(&self, arenas: &[Arena], idx: usize) -> usize {
        let a = &arenas[idx / self.records_per_arena];
        a.addr + (idx % self.records_per_arena) * self.layout.record_nbytes
    }

    /// Address of `key`'s record. Valid while the pool is open (a cache using it keeps it open).
    pub fn record_addr(&self, key: Key) -> Result<usize> {
        let idx = self.check_key(key)?;
        let g = self.arenas.read();
        let arenas = g.as_ref().ok_or_else(Self::closed_err)?;
        Ok(self.addr_in(arenas, idx))
    }

    /// Run `f(record address)` with the pool held open.
    fn with_record<T>(&self, key: Key, f: impl FnOnce(usize) -> Result<T>) -> Result<T> {
        let idx = self.check_key(key)?;
        let g = self.arenas.read();
        let arenas = g.as_ref().ok_or_else(Self::closed_err)?;
        f(self.addr_in(arenas, idx))
    }

    /// Copy `nbytes` from host address `src` into `tensor` of `key`.
    ///
    /// # Safety
    /// `src..src+nbytes` must be readable.
    pub unsafe fn write(&self, key: Key, tensor: &str, src: usize, nbytes: usize) -> Result<()> {
        let spec = self.layout.tensor(tensor)?;
        if nbytes != spec.nbytes {
            return Err(Error::InvalidArgument(format!(
                "tensor {tensor:?} holds {} bytes, got {nbytes}; the data must be exactly that size",
                spec.nbytes
            )));
        }
        let off = spec.offset;
        self.with_record(key, |rec| {
            // SAFETY: the record is open and the range lies inside it; caller vouches for src.
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, (rec + off) as *mut u8, nbytes) };
            Ok(())
        })
    }

    /// Copy of `tensor`'s bytes of `key` (the whole record when None).
    pub fn read(&self, key: Key, tensor: Option<&str>) -> Result<Vec<u8>> {
        let (off, n) = match tensor {
            Some(t) => {
                let s = self.layout.tensor(t)?;
                (s.offset, s.nbytes)
            }
            None => (0, self.layout.record_nbytes),
        };
        self.with_record(key, |rec| {
            // SAFETY: range inside the open record.
            Ok(unsafe { std::slice::from_raw_parts((rec + off) as *const u8, n) }.to_vec())
        })
    }

    /// A cache starts using the pool (refused once closed).
    pub fn add_user(&self) -> Result<()> {
        let g = self.arenas.read();
        if g.is_none() {
            return Err(Self::closed_err());
        }
        self.users.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    pub fn remove_user(&self) {
        let _ = self.users.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_sub(1));
    }

    /// Free the arenas. No-op when closed; SlotState error while a cache uses the pool.
    pub fn close(&self) -> Result<()> {
        let mut g = self.arenas.write();
        let users = self.users.load(Ordering::Acquire);
        if users > 0 {
            return Err(Error::SlotState(format!(
                "the pool is used by {users} open SlotCache(s); close them first"
            )));
        }
        if let Some(arenas) = g.take() {
            for a in arenas {
                self.device.free_pool(a.addr, a.bytes);
            }
        }
        Ok(())
    }

    /// Stream `entries` from the safetensors file at `path` into the pool; returns bytes read.
    pub fn load_safetensors(&self, path: &str, entries: &[LoadEntry]) -> Result<u64> {
        let file = File::open(path).map_err(|e| Error::Load(format!("{path}: cannot open: {e}")))?;
        let header = SafetensorsHeader::read(&file, path)?;
        let mut total = 0u64;
        for (i, (ftensor, layer, expert, ptensor, src_off, nbytes, dst_off)) in entries.iter().enumerate() {
            let what = || format!("{path}: entry {i} (file tensor {ftensor:?} -> ({layer}, {expert}, {ptensor:?}))");
            let key = self.key_from(*layer, *expert).map_err(|e| Error::UnknownExpert(format!("{}: {e}", what())))?;
            let spec = self.layout.tensor(ptensor).map_err(|e| Error::UnknownExpert(format!("{}: {e}", what())))?;
            let (begin, end) = header
                .tensors
                .get(ftensor)
                .copied()
                .ok_or_else(|| Error::Load(format!("{}: the file has no tensor {ftensor:?}", what())))?;
            if *src_off < 0 || *nbytes < 0 || *dst_off < 0 {
                return Err(Error::InvalidArgument(format!("{}: offsets and sizes must be >= 0", what())));
            }
            let (src_off, n, dst_off) = (*src_off as u64, *nbytes as u64, *dst_off as u64);
            // both operands < 2**63 (from i64), so these sums cannot wrap
            if src_off + n > end - begin {
                return Err(Error::InvalidArgument(format!(
                    "{}: bytes {src_off}..{} lie outside the file tensor's {} bytes",
                    what(),
                    src_off + n,
                    end - begin
                )));
            }
            if dst_off + n > spec.nbytes as u64 {
                return Err(Error::InvalidArgument(format!(
                    "{}: bytes {dst_off}..{} lie outside the pool tensor's {} bytes",
                    what(),
                    dst_off + n,
                    spec.nbytes
                )));
            }
            // inside the file: the header check bounded data_start + end by its length
            let pos = header.data_start + begin + src_off;
            let tensor_off = spec.offset;
            self.with_record(key, |rec| {
                // SAFETY: the destination range was checked to lie inside the open record.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut((rec + tensor_off + dst_off as usize) as *mut u8, n as usize)
                };
                file.read_exact_at(dst, pos).map_err(|e| Error::Load(format!("{}: read failed: {e}", what())))
            })?;
            total += n;
        }
        Ok(total)
    }
}

impl Drop for ExpertPool {
    fn drop(&mut self) {
        if let Some(arenas) = self.arenas.get_mut().take() {
            for a in arenas {
                self.device.free_pool(a.addr, a.bytes);
            }
        }
    }
}

/// Bytes a header entry's dtype and shape take: None when the dtype is not one we know the size
/// of (nothing to check), Some(None) when the size overflows.
fn tensor_nbytes(info: &serde_json::Value) -> Option<Option<u64>> {
    let item: u64 = match info.get("dtype")?.as_str()? {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    };
    let dims = info.get("shape")?.as_array()?;
    let mut n = Some(item);
    for d in dims {
        n = n.and_then(|n| d.as_u64().and_then(|d| n.checked_mul(d)));
    }
    Some(n)
}

/// The parts of a safetensors header we need: where each tensor's bytes are.
struct SafetensorsHeader {
    data_start: u64,
    /// name -> (begin, end) byte offsets relative to `data_start`.
    tensors: HashMap<String, (u64, u64)>,
}

impl SafetensorsHeader {
    fn read(file: &File, path: &str) -> Result<Self> {
        let bad = |m: String| Error::Load(format!("{path}: not a valid safetensors file: {m}"));
        let file_len = file.metadata().map_err(|e| Error::Load(format!("{path}: {e}")))?.len();
        let mut len8 = [0u8; 8];
        file.read_exact_at(&mut len8, 0).map_err(|e| bad(format!("cannot read the header length: {e}")))?;
        let hlen = u64::from_le_bytes(len8);
        if hlen > 100 << 20 || 8 + hlen > file_len {
            return Err(bad(format!("header length {hlen} does not fit the {file_len}-byte file")));
        }
        let mut buf = try_vec(hlen as usize, "the safetensors header")?;
        buf.resize(hlen as usize, 0u8);
        file.read_exact_at(&mut buf, 8).map_err(|e| bad(format!("cannot read the header: {e}")))?;
        let json: serde_json::Value = serde_json::from_slice(&buf).map_err(|e| bad(format!("header JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
        let data_start = 8 + hlen;
        let mut tensors = HashMap::with_capacity(obj.len());
        for (name, info) in obj {
            if name == "__metadata__" {
                continue;
            }
            let offs = info
                .get("data_offsets")
                .and_then(|v| v.as_array())
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
                .ok_or_else(|| bad(format!("tensor {name:?} has no valid data_offsets")))?;
            let data_len = file_len - data_start;
            if offs.0 > offs.1 || offs.1 > data_len {
                return Err(bad(format!(
                    "tensor {name:?} data_offsets [{}, {}] lie outside the file's {data_len} data bytes",
                    offs.0, offs.1
                )));
            }
            if let Some(expected) = tensor_nbytes(info) {
                let expected = expected.ok_or_else(|| bad(format!("tensor {name:?} shape overflows a 64-bit size")))?;
                if expected != offs.1 - offs.0 {
                    return Err(bad(format!(
                        "tensor {name:?} has data_offsets [{}, {}] ({} bytes) but its dtype and shape need {expected}",
                        offs.0,
                        offs.1,
                        offs.1 - offs.0
                    )));
                }
            }
            tensors.insert(name.clone(), offs);
        }
        Ok(Self { data_start, tensors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::HostDevice;
    use std::io::Write;
    use std::sync::Arc;

    fn pool(n: i64, arena: i64) -> ExpertPool {
        let layout = vec![("a".to_string(), 100), ("b".to_string(), 300)];
        let keys: Vec<(i64, i64)> = (0..n).map(|e| (e % 2, e)).collect();
        ExpertPool::new(Arc::new(HostDevice::new()), &layout, &keys, arena).unwrap()
    }

    #[test]
    fn layout_is_256_aligned_and_arenas_exact() {
        let p = pool(5, 2 * 768);
        assert_eq!(p.layout().tensors[1].offset, 256);
        assert_eq!(p.record_nbytes(), 768);
        assert_eq!(p.num_arenas(), 3);
        assert_eq!(p.allocated_bytes(), 5 * 768);
    }

    #[test]
    fn write_read_and_errors() {
        let p = pool(3, 1 << 20);
        let data = vec![9u8; 300];
        unsafe { p.write((0, 2), "b", data.as_ptr() as usize, 300).unwrap() };
        assert_eq!(p.read((0, 2), Some("b")).unwrap(), data);
        assert_eq!(p.read((0, 2), Some("a")).unwrap(), vec![0u8; 100]);
        assert!(matches!(unsafe { p.write((0, 2), "b", data.as_ptr() as usize, 299) }, Err(Error::InvalidArgument(_))));
        assert!(matches!(p.read((0, 1), None), Err(Error::UnknownExpert(_))));
        assert!(matches!(p.read((0, 0), Some("c")), Err(Error::UnknownExpert(_))));
        p.add_user().unwrap();
        assert!(matches!(p.close(), Err(Error::SlotState(_))));
        p.remove_user();
        p.close().unwrap();
        p.close().unwrap();
        assert!(matches!(p.read((0, 0), None), Err(Error::Closed(_))));
    }

    #[test]
    fn bad_constructor_arguments() {
        let d: SharedDevice = Arc::new(HostDevice::new());
        let l = vec![("a".to_string(), 10)];
        assert!(ExpertPool::new(d.clone(), &[], &[(0, 0)], 1 << 20).is_err());
        assert!(ExpertPool::new(d.clone(), &[("a".into(), 0)], &[(0, 0)], 1 << 20).is_err());
        assert!(ExpertPool::new(d.clone(), &l, &[(0, -1)], 1 << 20).is_err());
        assert!(ExpertPool::new(d.clone(), &l, &[(0, 0), (0, 0)], 1 << 20).is_err());
        assert!(ExpertPool::new(d, &l, &[(0, 0)], 10).is_err());
    }

    #[test]
    fn safetensors_streaming() {
        let data: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        let header = br#"{"__metadata__":{"k":"v"},"w":{"dtype":"U8","shape":[200],"data_offsets":[0,200]}}"#;
        let dir = std::env::temp_dir().join(format!("sida_st_{}", std::process::id()));
        let mut f = File::create(&dir).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header).unwrap();
        f.write_all(&data).unwrap();
        drop(f);
        let p = pool(2, 1 << 20);
        let path = dir.to_str().unwrap();
        let n = p.load_safetensors(path, &[("w".into(), 1, 1, "b".into(), 50, 100, 10)]).unwrap();
        assert_eq!(n, 100);
        let b = p.read((1, 1), Some("b")).unwrap();
        assert_eq!(&b[10..110], &data[50..150]);
        assert!(matches!(p.load_safetensors(path, &[("x".into(), 1, 1, "b".into(), 0, 1, 0)]), Err(Error::Load(_))));
        assert!(matches!(
            p.load_safetensors(path, &[("w".into(), 1, 1, "b".into(), 150, 100, 0)]),
            Err(Error::InvalidArgument(_))
        ));
        std::fs::remove_file(&dir).unwrap();
    }

    fn file_with_header(tag: &str, header: &str, data: usize) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("sida_st_{tag}_{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(&vec![7u8; data]).unwrap();
        path
    }

    #[test]
    fn safetensors_offsets_that_wrap_or_disagree_with_the_shape_are_refused() {
        let p = pool(1, 1 << 20);
        let huge = u64::MAX;
        let cases = [
            ("wrap", format!(r#"{{"w":{{"dtype":"U8","shape":[99],"data_offsets":[{},{}]}}}}"#, huge - 99, huge)),
            ("past_end", r#"{"w":{"dtype":"U8","shape":[200],"data_offsets":[0,200]}}"#.to_string()),
            ("shape", r#"{"w":{"dtype":"F32","shape":[10],"data_offsets":[0,64]}}"#.to_string()),
            ("shape_overflow", format!(r#"{{"w":{{"dtype":"F32","shape":[{huge},{huge}],"data_offsets":[0,64]}}}}"#)),
        ];
        for (tag, header) in cases {
            let path = file_with_header(tag, &header, 64);
            let r = p.load_safetensors(path.to_str().unwrap(), &[("w".into(), 0, 0, "a".into(), 0, 64, 0)]);
            std::fs::remove_file(&path).unwrap();
            match r {
                Err(Error::Load(m)) => assert!(m.contains(path.to_str().unwrap()) && m.contains("\"w\""), "{tag}: {m}"),
                other => panic!("{tag}: expected a Load error, got {other:?}"),
            }
        }
        assert_eq!(p.read((0, 0), Some("a")).unwrap(), vec![0u8; 100]); // nothing was copied
    }
}
