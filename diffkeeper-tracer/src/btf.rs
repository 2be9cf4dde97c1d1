//! Kernel struct field offsets from the running kernel's BTF.
//!
//! Rust eBPF programs get no CO-RE relocations, so an offset compiled in
//! from one kernel's headers would be wrong on another. Instead userspace
//! reads the offsets it needs from `/sys/kernel/btf/vmlinux` at start and
//! hands them to the programs as globals.
//!
//! This is a reader for the small part of the BTF format that needs (the
//! header, the type records, the string table); the one BTF crate on
//! crates.io is LGPL, which this Apache-2.0 project does not take in.

use std::collections::HashMap;

use crate::error::{unsupported, Context, Result};

/// Where the kernel publishes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
/// Kinds that only qualify or rename another type.
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// A struct or union member.
#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    /// Offset in bits from the start of the containing type.
    bit_offset: u32,
}

#[derive(Debug, Clone)]
enum Type {
    Composite {
        members: Vec<Member>,
    },
    /// typedef/const/volatile/...: look through to `target`.
    Alias {
        target: u32,
    },
    Other,
}

/// The parsed types of one BTF blob.
pub struct Btf {
    /// Indexed by type id; id 0 is `void`.
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32> {
    let raw = bytes.get(at..at + 4).context("BTF is truncated")?;
    Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
}

fn string_at(strings: &[u8], offset: u32) -> String {
    let tail = strings.get(offset as usize..).unwrap_or_default();
    let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
    String::from_utf8_lossy(&tail[..end]).into_owned()
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_kernel() -> Result<Btf> {
        let bytes = std::fs::read(VMLINUX).with_context(|| {
            format!("cannot read {VMLINUX}: this kernel was built without BTF (CONFIG_DEBUG_INFO_BTF), which the eBPF tracer needs")
        })?;
        Btf::parse(&bytes).with_context(|| format!("cannot parse {VMLINUX}"))
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(bytes: &[u8]) -> Result<Btf> {
        if bytes.len() < 24 || u16::from_le_bytes([bytes[0], bytes[1]]) != MAGIC {
            unsupported!("not little-endian BTF (bad magic)");
        }
        let header_len = u32_at(bytes, 4)? as usize;
        let (type_off, type_len) = (u32_at(bytes, 8)? as usize, u32_at(bytes, 12)? as usize);
        let (str_off, str_len) = (u32_at(bytes, 16)? as usize, u32_at(bytes, 20)? as usize);
        let types_bytes = bytes
            .get(header_len + type_off..header_len + type_off + type_len)
            .context("BTF type section out of bounds")?;
        let strings = bytes
            .get(header_len + str_off..header_len + str_off + str_len)
            .context("BTF string section out of bounds")?;

        let mut types = vec![Type::Other];
        let mut structs_by_name = HashMap::new();
        let mut at = 0;
        while at < types_bytes.len() {
            let name_off = u32_at(types_bytes, at)?;
            let info = u32_at(types_bytes, at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let size_or_type = u32_at(types_bytes, at + 8)?;
            at += 12;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(types_bytes, m + 8)?;
                        members.push(Member {
                            name: string_at(strings, u32_at(types_bytes, m)?),
                            type_id: u32_at(types_bytes, m + 4)?,
                            // With kind_flag, the low 24 bits are the offset
                            // and the high 8 the bitfield size.
                            bit_offset: if kind_flag {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    let name = string_at(strings, name_off);
                    if kind == KIND_STRUCT && !name.is_empty() {
                        structs_by_name.entry(name).or_insert(types.len() as u32);
                    }
                    Type::Composite { members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias {
                        target: size_or_type,
                    }
                }
                _ => Type::Other,
            };
            // Skip the kind's trailing data.
            at += match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                _ => 0,
            };
            types.push(ty);
        }
        Ok(Btf {
            types,
            structs_by_name,
        })
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Alias { target } => id = *target,
                other => return Some(other),
            }
        }
        None
    }

    /// Finds `name` among `id`'s members, looking into anonymous struct and
    /// union members; returns its bit offset and type.
    fn find_member(&self, id: u32, name: &str, depth: u32) -> Option<(u32, u32)> {
        let Type::Composite { members, .. } = self.resolve(id)? else {
            return None;
        };
        for m in members {
            if m.name == name {
                return Some((m.bit_offset, m.type_id));
            }
        }
        if depth > 8 {
            return None;
        }
        for m in members.iter().filter(|m| m.name.is_empty()) {
            if let Some((offset, ty)) = self.find_member(m.type_id, name, depth + 1) {
                return Some((m.bit_offset + offset, ty));
            }
        }
        None
    }

    /// Byte offset of `path` (e.g. `["f_path", "dentry"]`) in `struct name`.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u32> {
        let mut id = *self
            .structs_by_name
            .get(name)
            .with_context(|| format!("the kernel's BTF has no struct {name}"))?;
        let mut bits = 0;
        for field in path {
            let (offset, ty) = self
                .find_member(id, field, 0)
                .with_context(|| format!("struct {name} has no member {}", path.join(".")))?;
            bits += offset;
            id = ty;
        }
        if bits % 8 != 0 {
            unsupported!("{name}.{} is a bitfield", path.join("."));
        }
        Ok(bits / 8)
    }

    /// Names of structs parsed (for tests and diagnostics).
    pub fn struct_count(&self) -> usize {
        self.structs_by_name.len()
    }
}

/// The kernel field offsets the programs use, named as their globals.
pub fn kernel_offsets(btf: &Btf) -> Result<Vec<(&'static str, u32)>> {
    Ok(vec![
        ("OFF_TASK_FILES", btf.offset_of("task_struct", &["files"])?),
        ("OFF_FILES_FDT", btf.offset_of("files_struct", &["fdt"])?),
        ("OFF_FDT_FD", btf.offset_of("fdtable", &["fd"])?),
        ("OFF_FILE_INODE", btf.offset_of("file", &["f_inode"])?),
        (
            "OFF_FILE_DENTRY",
            btf.offset_of("file", &["f_path", "dentry"])?,
        ),
        ("OFF_DENTRY_PARENT", btf.offset_of("dentry", &["d_parent"])?),
        ("OFF_DENTRY_INODE", btf.offset_of("dentry", &["d_inode"])?),
        ("OFF_INODE_INO", btf.offset_of("inode", &["i_ino"])?),
        ("OFF_INODE_SB", btf.offset_of("inode", &["i_sb"])?),
        ("OFF_SB_DEV", btf.offset_of("super_block", &["s_dev"])?),
        ("OFF_TASK_FS", btf.offset_of("task_struct", &["fs"])?),
        (
            "OFF_FS_PWD_DENTRY",
            btf.offset_of("fs_struct", &["pwd", "dentry"])?,
        ),
        ("OFF_INODE_MODE", btf.offset_of("inode", &["i_mode"])?),
        // Told apart from a later inode given the same number.
        (
            "OFF_INODE_GENERATION",
            btf.offset_of("inode", &["i_generation"])?,
        ),
        // The list of an inode's dentries, linked through `d_u.d_alias`.
        ("OFF_INODE_DENTRY", btf.offset_of("inode", &["i_dentry"])?),
        (
            "OFF_DENTRY_ALIAS",
            btf.offset_of("dentry", &["d_u", "d_alias"])?,
        ),
        // How many shared writable mappings the file has (an `atomic_t`).
        ("OFF_INODE_MAPPING", btf.offset_of("inode", &["i_mapping"])?),
        (
            "OFF_MAPPING_WRITABLE",
            btf.offset_of("address_space", &["i_mmap_writable"])?,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_btf_gives_the_offsets_the_programs_need() {
        let btf = Btf::from_kernel().expect("this kernel has BTF");
        assert!(
            btf.struct_count() > 1000,
            "only {} structs parsed",
            btf.struct_count()
        );
        let offsets = kernel_offsets(&btf).expect("every offset is found");
        assert!(
            offsets.iter().all(|&(_, off)| off < 16 * 1024),
            "{offsets:?}"
        );
        // A member reached through nesting is the sum of both offsets.
        let path = btf.offset_of("file", &["f_path"]).expect("f_path");
        let dentry = btf
            .offset_of("file", &["f_path", "dentry"])
            .expect("f_path.dentry");
        let in_path = btf.offset_of("path", &["dentry"]).expect("path.dentry");
        assert_eq!(dentry, path + in_path);
        assert!(btf.offset_of("task_struct", &["no_such_member"]).is_err());
        assert!(Btf::parse(b"not btf at all, not btf at all").is_err());
    }
}
