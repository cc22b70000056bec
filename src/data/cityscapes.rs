//! The 19 Cityscapes evaluation classes: train id, official labelId, name and
//! colour (from the official `cityscapesscripts/helpers/labels.py`). Every
//! other labelId maps to the ignore label 255.

/// Ignore label in train-id maps.
pub const IGNORE: u8 = 255;

/// One evaluated class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Class {
    pub train_id: u8,
    pub label_id: u8,
    pub name: &'static str,
    pub color: [u8; 3],
}

const fn c(train_id: u8, label_id: u8, name: &'static str, color: [u8; 3]) -> Class {
    Class {
        train_id,
        label_id,
        name,
        color,
    }
}

/// The 19 train classes, indexed by train id.
pub const CLASSES: [Class; 19] = [
    c(0, 7, "road", [128, 64, 128]),
    c(1, 8, "sidewalk", [244, 35, 232]),
    c(2, 11, "building", [70, 70, 70]),
    c(3, 12, "wall", [102, 102, 156]),
    c(4, 13, "fence", [190, 153, 153]),
    c(5, 17, "pole", [153, 153, 153]),
    c(6, 19, "traffic light", [250, 170, 30]),
    c(7, 20, "traffic sign", [220, 220, 0]),
    c(8, 21, "vegetation", [107, 142, 35]),
    c(9, 22, "terrain", [152, 251, 152]),
    c(10, 23, "sky", [70, 130, 180]),
    c(11, 24, "person", [220, 20, 60]),
    c(12, 25, "rider", [255, 0, 0]),
    c(13, 26, "car", [0, 0, 142]),
    c(14, 27, "truck", [0, 0, 70]),
    c(15, 28, "bus", [0, 60, 100]),
    c(16, 31, "train", [0, 80, 100]),
    c(17, 32, "motorcycle", [0, 0, 230]),
    c(18, 33, "bicycle", [119, 11, 32]),
];

/// labelId -> train id (255 for classes not evaluated).
pub fn label_to_train(label_id: u8) -> u8 {
    CLASSES
        .iter()
        .find(|c| c.label_id == label_id)
        .map_or(IGNORE, |c| c.train_id)
}

/// train id -> labelId (0, "unlabeled", for ignore or out of range).
pub fn train_to_label(train_id: u8) -> u8 {
    CLASSES.get(train_id as usize).map_or(0, |c| c.label_id)
}

/// train id -> colour (black for ignore).
pub fn train_color(train_id: u8) -> [u8; 3] {
    CLASSES.get(train_id as usize).map_or([0, 0, 0], |c| c.color)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_ids_round_trip_and_unknown_ids_are_ignored() {
        for c in CLASSES {
            assert_eq!(label_to_train(c.label_id), c.train_id);
            assert_eq!(train_to_label(c.train_id), c.label_id);
        }
        // 0 unlabeled, 6 ground, 9 parking, 29 caravan, 34 license plate
        for id in [0u8, 6, 9, 29, 30, 34, 200] {
            assert_eq!(label_to_train(id), IGNORE, "labelId {id}");
        }
        assert_eq!(train_to_label(IGNORE), 0);
    }
}
