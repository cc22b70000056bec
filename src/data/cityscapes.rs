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
        // cityscapesScripts' labels.py, (name, id, trainId) of the 19
        // evaluated classes, written out from the official table.
        let official: [(&str, u8, u8); 19] = [
            ("road", 7, 0),
            ("sidewalk", 8, 1),
            ("building", 11, 2),
            ("wall", 12, 3),
            ("fence", 13, 4),
            ("pole", 17, 5),
            ("traffic light", 19, 6),
            ("traffic sign", 20, 7),
            ("vegetation", 21, 8),
            ("terrain", 22, 9),
            ("sky", 23, 10),
            ("person", 24, 11),
            ("rider", 25, 12),
            ("car", 26, 13),
            ("truck", 27, 14),
            ("bus", 28, 15),
            ("train", 31, 16),
            ("motorcycle", 32, 17),
            ("bicycle", 33, 18),
        ];
        for (name, id, train) in official {
            assert_eq!(label_to_train(id), train, "{name}");
            assert_eq!(train_to_label(train), id, "{name}");
            assert_eq!(CLASSES[train as usize].name, name);
        }
        // 0 unlabeled, 6 ground, 9 parking, 29 caravan, 34 license plate
        for id in [0u8, 6, 9, 29, 30, 34, 200] {
            assert_eq!(label_to_train(id), IGNORE, "labelId {id}");
        }
        assert_eq!(train_to_label(IGNORE), 0);
    }
}
