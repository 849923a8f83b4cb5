//! Image classification folders in cn_clip's zero-shot layout (`{dataset}/test/000/….jpg`, the
//! class names in `{dataset}/label_cn.txt`), read in torchvision `ImageFolder`'s order so that
//! image ids and labels are the indices cn_clip's `zeroshot_evaluation.py` sees:
//! - classes are the sorted names of the root's subdirectories, numbered from 0;
//! - each class's files are walked recursively (following links), directories in sorted order
//!   of their full path and files sorted by name, keeping the extensions `ImageFolder` accepts
//!   (case-insensitively);
//! - image id `k` is the `k`-th file of that order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayBuilder, ArrayRef, BinaryBuilder, Int64Builder, StringBuilder};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use super::{BATCH_BYTES, Emit, ReadContext, Source};
use crate::error::{Error, Result, io};
use crate::quarantine::Rejected;
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use crate::storage;
use schemars::JsonSchema;
use serde::Deserialize;

/// torchvision's `IMG_EXTENSIONS`.
const EXTENSIONS: [&str; 9] = [".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"];

/// The largest image file read (the record limit of the line sources).
const MAX_IMAGE_BYTES: u64 = super::MAX_RECORD_BYTES as u64;

/// One image of the set, in `ImageFolder`'s order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub label: usize,
}

/// The class folder names, sorted (their index is the label). Hidden folders (`.name`, as
/// `.ipynb_checkpoints` that Jupyter leaves) are not classes: torchvision would count them, and
/// sorted first they would shift every label by one (see [`hidden_folders`]).
///
/// # Errors
/// When `root` is not a readable directory or has no class folders.
pub fn classes(root: &Path) -> Result<Vec<String>> {
    let mut classes = Vec::new();
    for entry in storage::read_dir(root).map_err(io(root))? {
        let entry = entry.map_err(io(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() && !name.starts_with('.') {
            classes.push(name);
        }
    }
    classes.sort();
    if classes.is_empty() {
        return Err(Error::Format {
            path: root.display().to_string(),
            reason: "no class folders (expected e.g. 000/, 001/, …)".into(),
        });
    }
    Ok(classes)
}

/// The hidden folders of `root` that [`classes`] leaves out, sorted (for a note to the user).
pub fn hidden_folders(root: &Path) -> Vec<String> {
    let mut hidden: Vec<String> = storage::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    hidden.sort();
    hidden
}

/// A directory's identity (device, inode), to recognise one reached again through a link.
fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = storage::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Every image of the set, in `ImageFolder`'s order. Links are followed as `os.walk(…,
/// followlinks=True)` does, but a link back to a folder being walked (a loop, which os.walk
/// follows until paths grow too long, counting the same images again at every level) or to a
/// folder the class already reaches (links fanning out, which multiply the walk) is an error
/// naming it; SIGINT and SIGTERM stop the walk.
///
/// # Errors
/// IO errors walking `root`, a link loop, an interruption.
pub fn entries(root: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for (label, class) in classes(root)?.iter().enumerate() {
        // os.walk's (root, dirs, files) triples, sorted by their root string.
        let mut walk: Vec<(String, Vec<String>)> = Vec::new();
        let top = root.join(class);
        let root_id = identity(root).map_err(io(root))?;
        let top_id = identity(&top).map_err(io(&top))?;
        // Every folder of the class, once: a second way in (links fanning out to the same
        // folders) would multiply the walk without end in sight.
        let mut visited = std::collections::HashSet::from([top_id]);
        let mut stack = vec![(top.clone(), Arc::new(vec![root_id, top_id]))];
        while let Some((dir, ancestors)) = stack.pop() {
            if let Some(signal) = crate::signals::interrupted() {
                return Err(Error::Interrupted { signal });
            }
            let mut files = Vec::new();
            for entry in storage::read_dir(&dir).map_err(io(&dir))? {
                let entry = entry.map_err(io(&dir))?;
                let path = entry.path();
                if path.is_dir() {
                    let id = identity(&path).map_err(io(&path))?;
                    if ancestors.contains(&id) {
                        return Err(Error::Format {
                            path: path.display().to_string(),
                            reason: "a symbolic link loop (it leads back to a folder that contains it): the walk \
                                     would never end; remove the link"
                                .into(),
                        });
                    }
                    if !visited.insert(id) {
                        return Err(Error::Format {
                            path: path.display().to_string(),
                            reason: "a folder this class already reaches another way (through symbolic links): its \
                                     images would count twice, and links fanning out this way multiply without \
                                     end; remove the link"
                                .into(),
                        });
                    }
                    let mut inner = ancestors.as_ref().clone();
                    inner.push(id);
                    stack.push((path, Arc::new(inner)));
                } else {
                    files.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
            files.sort();
            walk.push((dir.to_string_lossy().into_owned(), files));
        }
        walk.sort();
        for (dir, files) in walk {
            for file in files {
                let lower = file.to_lowercase();
                if EXTENSIONS.iter().any(|ext| lower.ends_with(ext)) {
                    entries.push(Entry { path: Path::new(&dir).join(file), label });
                }
            }
        }
    }
    Ok(entries)
}

/// A zero-shot image folder (the directory holding the class folders) as a source of
/// `labeled_images` batches. The folder is walked once, when the source is opened.
pub struct ImageFolderSource {
    root: PathBuf,
    entries: Vec<Entry>,
}

impl ImageFolderSource {
    /// Lists the set under `root`.
    ///
    /// # Errors
    /// When `root` has no class folders or cannot be walked.
    pub fn open(root: PathBuf) -> Result<Self> {
        let entries = entries(&root)?;
        Ok(ImageFolderSource { root, entries })
    }
}

impl Source for ImageFolderSource {
    fn origin(&self) -> String {
        self.root.display().to_string()
    }

    fn estimated_records(&self) -> Option<u64> {
        Some(self.entries.len() as u64)
    }

    fn schema(&self) -> SchemaRef {
        cnclip_schemas::labeled_images()
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let schema = self.schema();
        let (mut ids, mut images, mut labels, mut paths) =
            (Int64Builder::new(), BinaryBuilder::new(), Int64Builder::new(), StringBuilder::new());
        let mut bytes = 0;
        let mut flush = |ids: &mut Int64Builder,
                         images: &mut BinaryBuilder,
                         labels: &mut Int64Builder,
                         paths: &mut StringBuilder| {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(ids.finish()),
                Arc::new(images.finish()),
                Arc::new(labels.finish()),
                Arc::new(paths.finish()),
            ];
            emit(RecordBatch::try_new(schema.clone(), columns)?)
        };
        for (k, entry) in self.entries.iter().enumerate() {
            if !ctx.shard.owns(k as u64) {
                continue;
            }
            let relative = entry.path.strip_prefix(&self.root).unwrap_or(&entry.path).to_string_lossy().into_owned();
            if let Some(signal) = crate::signals::interrupted() {
                return Err(Error::Interrupted { signal });
            }
            // A FIFO or a device named like an image would block or never end: not read.
            let data = match storage::metadata(&entry.path) {
                Ok(meta) if !meta.is_file() => Err(format!("{}, not a regular file", super::parts::kind_of(&meta))),
                Ok(meta) if meta.len() > MAX_IMAGE_BYTES => {
                    Err(format!("a file of {} bytes, past the limit of {MAX_IMAGE_BYTES} for an image", meta.len()))
                }
                _ => match storage::read(&entry.path) {
                    Ok(data) if data.is_empty() => Err("empty file".to_string()),
                    Ok(data) => Ok(data),
                    Err(e) => Err(e.to_string()),
                },
            };
            let data = match data {
                Ok(data) => data,
                Err(reason) => {
                    ctx.quarantine.reject(Rejected {
                        source: self.root.display().to_string(),
                        location: relative,
                        id: Some(k.to_string()),
                        reason,
                    })?;
                    continue;
                }
            };
            ids.append_value(k as i64);
            images.append_value(&data);
            labels.append_value(entry.label as i64);
            paths.append_value(&relative);
            bytes += data.len();
            if ids.len() >= ctx.batch_rows.max(1) || bytes >= BATCH_BYTES {
                bytes = 0;
                flush(&mut ids, &mut images, &mut labels, &mut paths)?;
            }
        }
        if ids.len() > 0 {
            flush(&mut ids, &mut images, &mut labels, &mut paths)?;
        }
        Ok(())
    }
}

/// torchvision `ImageFolder`'s layout (cn_clip's zero-shot sets) → labeled_images, in
/// `ImageFolder`'s order.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageFolderConfig {
    /// The root: one folder of images per class.
    pub path: PathBuf,
}

impl NodeConfig for ImageFolderConfig {
    const KIND: &'static str = "image_folder";
    const ROLE: Role = Role::Source;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let root = cx.dir(&self.path, "image folder")?;
        Ok(Operator::Source(Box::new(ImageFolderSource::open(root).map_err(|e| vec![e.to_string()])?)))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(cnclip_schemas::labeled_images())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_folder_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (path, data) in [
            ("001/b.JPG", "x"),
            ("001/a.png", "x"),
            ("000/z.jpg", "x"),
            ("000/sub/a.jpg", "x"),
            ("000/sub-b/a.jpg", "x"),
            ("000/notes.txt", "x"),
            ("010/a.webp", "x"),
        ] {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        std::fs::write(root.join("stray.jpg"), "x").unwrap();
        let found: Vec<(String, usize)> = entries(root)
            .unwrap()
            .into_iter()
            .map(|e| (e.path.strip_prefix(root).unwrap().display().to_string(), e.label))
            .collect();
        // Directories sort as whole path strings: "000" < "000/sub" < "000/sub-b".
        assert_eq!(
            found,
            [
                ("000/z.jpg".to_string(), 0),
                ("000/sub/a.jpg".to_string(), 0),
                ("000/sub-b/a.jpg".to_string(), 0),
                ("001/a.png".to_string(), 1),
                ("001/b.JPG".to_string(), 1),
                ("010/a.webp".to_string(), 2),
            ]
        );
    }
}
