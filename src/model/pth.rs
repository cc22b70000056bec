//! PyTorch checkpoints in both of `torch.save`'s layouts, as the official
//! files are: the zip archive (PyTorch ≥ 1.6) and the legacy stream the
//! official checkpoints were written in (PyTorch 1.3, NVIDIA's 19.10
//! image; `_use_new_zipfile_serialization=False` writes it today).
//!
//! candle's pickle machine parses the pickles and each tensor's
//! `_rebuild_tensor_v2` arguments (storage key, dtype, offset, shape,
//! stride); the storages are read here, and each tensor is gathered from
//! its storage by its strides, so views (offsets into a shared storage,
//! transposed or otherwise non-contiguous tensors) read as PyTorch sees them.
//!
//! The legacy layout is five pickles and the raw storages, one after
//! another: the magic number, the protocol version, the system info, the
//! object (its storages as persistent ids), the list of storage keys; then
//! for each key, an 8-byte little-endian element count followed by its
//! little-endian data.

use crate::{Error, Result};
use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::path::Path;

/// The legacy stream's first pickle: protocol 2, `LONG1` of 10 bytes, the
/// magic number 0x1950a86a20f9469cfc6c (torch/serialization.py) little
/// endian, `STOP`. Read here: candle's `LONG1` shifts an i64 past 64 bits.
const MAGIC_PICKLE: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
];

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads every tensor of a `.pth` file (the `state_dict` entry of a dict
/// that has one, else the dict itself) with the names as stored.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut head = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| Error::io("reading", path, e))?;
    if &head == b"PK" {
        read_zip(path)
    } else {
        read_legacy(path)
    }
}

fn read_zip(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let infos = match candle_core::pickle::read_pth_tensor_info(path, false, Some("state_dict")) {
        Ok(v) if !v.is_empty() => v,
        _ => candle_core::pickle::read_pth_tensor_info(path, false, None)
            .map_err(|e| err(path, e.to_string()))?,
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut zip =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| err(path, e.to_string()))?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        if !storages.contains_key(&info.path) {
            let mut entry = zip
                .by_name(&info.path)
                .map_err(|e| err(path, format!("{}: {e}", info.path)))?;
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| err(path, format!("{}: {e}", info.path)))?;
            storages.insert(info.path.clone(), bytes);
        }
        let t = gather(&info, &storages[&info.path]).map_err(|m| err(path, format!("{}: {m}", info.name)))?;
        out.push((info.name, t));
    }
    Ok(out)
}

/// One pickle from `r`.
fn pickle<R: BufRead>(r: &mut R, path: &Path, what: &str) -> Result<Object> {
    let mut stack = Stack::empty();
    stack
        .read_loop(r)
        .map_err(|e| err(path, format!("reading the {what}: {e}")))?;
    stack
        .finalize()
        .map_err(|e| err(path, format!("reading the {what}: {e}")))
}

fn read_legacy(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut r = std::io::BufReader::new(file);
    let mut magic = [0u8; 15];
    if r.read_exact(&mut magic).is_err() || magic != MAGIC_PICKLE {
        return Err(err(
            path,
            "neither a zip archive nor PyTorch's legacy serialisation (no magic number)",
        ));
    }
    let _protocol = pickle(&mut r, path, "protocol version")?;
    let _sys_info = pickle(&mut r, path, "system info")?;
    let obj = pickle(&mut r, path, "object")?;
    let keys = pickle(&mut r, path, "storage keys")?;
    let keys: Vec<String> = match keys {
        Object::List(v) => v
            .into_iter()
            .map(|k| {
                k.unicode()
                    .map_err(|o| err(path, format!("a storage key is {o:?}")))
            })
            .collect::<Result<_>>()?,
        o => return Err(err(path, format!("the storage keys are {o:?}"))),
    };
    let dict = match obj {
        Object::Dict(kv) => {
            let sd = kv
                .iter()
                .position(|(k, _)| *k == Object::Unicode("state_dict".into()));
            match sd {
                Some(i) => match kv.into_iter().nth(i).map(|x| x.1) {
                    Some(Object::Dict(inner)) => inner,
                    _ => return Err(err(path, "`state_dict` is not a dict")),
                },
                None => kv,
            }
        }
        _ => return Err(err(path, "the checkpoint is not a dict of tensors")),
    };
    let mut infos: Vec<TensorInfo> = vec![];
    for (name, value) in dict {
        if let Some(info) = value
            .into_tensor_info(name, Path::new(""))
            .map_err(|e| err(path, e.to_string()))?
        {
            infos.push(info);
        }
    }
    // the storages, in the order of their keys
    let dtype_of: HashMap<&str, DType> = infos
        .iter()
        .map(|i| (i.path.trim_start_matches('/'), i.dtype))
        .collect();
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for key in &keys {
        let mut n = [0u8; 8];
        r.read_exact(&mut n)
            .map_err(|e| err(path, format!("storage {key}: {e}")))?;
        let numel = u64::from_le_bytes(n) as usize;
        let size = dtype_of.get(key.as_str()).map_or(4, |d| d.size_in_bytes());
        let mut bytes = vec![0u8; numel * size];
        r.read_exact(&mut bytes)
            .map_err(|e| err(path, format!("storage {key} ({numel} elements): {e}")))?;
        storages.insert(format!("/{key}"), bytes);
    }
    infos
        .into_iter()
        .map(|info| {
            let bytes = storages
                .get(&info.path)
                .ok_or_else(|| err(path, format!("{}: storage {} is missing", info.name, info.path)))?;
            let t = gather(&info, bytes).map_err(|m| err(path, format!("{}: {m}", info.name)))?;
            Ok((info.name, t))
        })
        .collect()
}

/// The tensor `info` describes, gathered from its storage by its offset
/// and strides (in elements).
fn gather(info: &TensorInfo, storage: &[u8]) -> std::result::Result<Tensor, String> {
    let l = &info.layout;
    let es = info.dtype.size_in_bytes();
    let dims = l.dims().to_vec();
    let strides = l.stride().to_vec();
    let start = l.start_offset() / es;
    let n: usize = dims.iter().product();
    let mut out = Vec::with_capacity(n * es);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..n {
        let off = start + idx.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>();
        let b = storage
            .get(off * es..(off + 1) * es)
            .ok_or_else(|| format!("element {off} is outside its storage of {} bytes", storage.len()))?;
        out.extend_from_slice(b);
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            if idx[d] < dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Tensor::from_raw_buffer(&out, info.dtype, &dims, &Device::Cpu).map_err(|e| e.to_string())
}
