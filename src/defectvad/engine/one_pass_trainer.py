# src/defectvad/engine/one_pass_trainer.py
import logging

from defectvad.engine.base_trainer import BaseTrainer

log = logging.getLogger(__name__)


class OnePassTrainer(BaseTrainer):
    # models that learn nothing by gradient: one epoch collects features, its end fits the statistics
    trainer_arguments = {"max_epochs": 1}

    def configure_engine(self, **settings):
        # more epochs would only repeat the same pass (the bank is rebuilt each time): as anomalib, whose
        # trainer_arguments override the trainer's, one epoch whatever trainer.max_epochs says (a sweep over
        # several models can set it for the others)
        super().configure_engine(**settings)
        if self.max_epochs != 1:
            log.info("%s fits in one pass: trainer.max_epochs=%s is ignored, one epoch is run",
                     type(self).__name__, self.max_epochs)
            self.max_epochs = 1
        return self

    def training_step(self, batch, batch_idx):
        self.model(batch["image"])
        return None

    def on_train_epoch_end(self):
        self.model.fit()
