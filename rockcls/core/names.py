"""Every tag and artifact name rockcls writes to or reads from the tracking store, in one place.

Tags are what the MLflow UI filters on (``tags.`rockcls.kind` = 'train'``) and what one command
reads of another's runs (the ensemble checks members' split tags, predict finds a train run's
checkpoints), so writer and reader must spell them the same way.
"""

# --------------------------------------------------------------------- MLflow's own tags
PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"  # the description of a run or experiment in the MLflow UI
SOURCE_NAME = "mlflow.source.name"
RUN_NAME = "mlflow.runName"

# --------------------------------------------------------------------- what a run is
KIND = "rockcls.kind"  # train, fold, full, trial, ensemble, predict, study
TEACHER = "rockcls.teacher"  # a distilled run's teacher (models:/... or an ensemble run id)
COMPLETE = "rockcls.complete"  # "true" once a train run has every fold's OOF logits
FOLD = "rockcls.fold"
FOLDS = "rockcls.folds"
BACKBONE = "rockcls.backbone"
SEED = "rockcls.seed"
EPOCHS_RUN = "rockcls.epochs_run"
FAIL_REASON = "rockcls.fail_reason"  # the one-line reason of a FAILED or KILLED run

# --------------------------------------------------------------------- the data and split (ensemble members must agree)
DATA_FINGERPRINT = "rockcls.data_fingerprint"
SPLIT_FINGERPRINT = "rockcls.split_fingerprint"
SPLIT_SEED = "rockcls.split_seed"

# --------------------------------------------------------------------- ensembles and registered models
MEMBERS = "rockcls.members"
STRATEGY = "rockcls.strategy"
TTA = "rockcls.tta"
NETWORKS = "rockcls.networks"  # a registered version's networks: folds (k per member) or full (one per member)
ENSEMBLE_RUN = "rockcls.ensemble_run"
MODEL_URI = "rockcls.model_uri"
REGISTERED_MODEL = "rockcls.registered_model"  # on an ensemble run: the name it was registered under
MODEL_VERSION = "rockcls.model_version"  # ... the version it became
CHAMPION = "rockcls.champion"  # ... "true" when that version took @champion
MODEL = "rockcls.model"  # on a predict or evaluate run: the model it used (run id or models:/ URI)
SCORE = "rockcls.macro_f1"  # the honest score on a registered version; @champion compares it

# --------------------------------------------------------------------- the Optuna study
STUDY = "rockcls.study"
TRIAL = "rockcls.trial"
TRIAL_STATE = "rockcls.trial_state"
STORAGE = "rockcls.storage"
WORKER = "rockcls.worker"
BASELINE = "rockcls.baseline"

# --------------------------------------------------------------------- artifacts
CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.csv"
CLASSES_FILE = "classes.json"
OOF_LOGITS = "oof_logits.npz"  # a train run's out-of-fold logits (ids, paths, labels, logits, fold, classes)
OOF_FOLD = "oof_fold.npz"  # one fold run's share of them
FOLD_MODEL = "checkpoints/model.pt"  # the weights a fold run keeps
CONFUSION_FIGURE = "confusion_matrix.png"  # a train or ensemble run's OOF confusion matrix
SKIPPED_FILE = "skipped_images.tsv"  # the images a run left out (skip_bad_images) and why
ENSEMBLE_FILE = "ensemble.json"
TEACHER_DIR = "teacher"  # a distilled run's cached teacher probabilities (teacher/<key>.npz)
SCORES_FILE = "scores.csv"  # an ensemble run's candidates and their honest scores
ERRORS_FILE = "errors.tsv"  # a predict run's unreadable rows
PREDICTIONS_FILE = "predictions.csv"  # an evaluate run's predictions table
PER_CLASS_FILE = "per_class.csv"  # ... its per-class precision, recall and F1
CONFUSION_ROWS_FIGURE = "confusion_matrix_rows.png"  # ... counts coloured by row share (MLflow writes CONFUSION_FIGURE)
RELIABILITY_FIGURE = "reliability.png"  # ... its reliability diagram
PROBLEMS_FILE = "problems.tsv"  # ... the rows it left out and why

# --------------------------------------------------------------------- hard examples (a fold run's galleries)
# Image keys: the run page shows each key's images with a step (epoch) slider.
HARDEST_OOF = "hardest_oof"  # the kept weights' highest-loss out-of-fold images (step = kept epoch)
HARDEST_VAL = "hardest_val"  # every gallery_every epochs: that epoch's highest-loss validation images
HN_MEMORY = "hn_memory"  # what the hard-negative memory holds (step = epoch)
CONFIDENTLY_WRONG = "confidently_wrong"  # an evaluate run's most confidently wrong images (its own folder: none)
GALLERY_DIR = "hard_examples"  # the galleries' tables (<key>[_epoch_<n>].csv) and the final grid's PNG
