"""How good samples are, by the features of a small Fashion-MNIST classifier: the classifier itself
(trained once and cached), FID, KID, precision/recall and the classes it sees. Pure tensor math but
for the cache; evaluate.py is its command line."""
import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cli import check_writable, first_line
from data import CLASSES, to_model_range
from files import atomic_save

CLASSIFIER_FORMAT = "fashion-mnist-classifier/2"
NEIGHBOURS = 3  # k of precision and recall's k-NN balls: a set of fewer than k + 1 has none
CLASSIFIER_SETTINGS = {"epochs": 5, "seed": 0, "batch_size": 128, "lr": 3e-3, "features": 128}


class Classifier(nn.Module):
    """Two conv-conv-pool stages and a 128-wide hidden layer, whose activations are the features."""

    def __init__(self, features=128):
        super().__init__()

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.MaxPool2d(2)]

        self.body = nn.Sequential(*stage(1, 32), *stage(32, 64), nn.Flatten(),
                                  nn.Linear(64 * 7 * 7, features), nn.BatchNorm1d(features),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(features, 10))

    def forward(self, x):
        """[B, 1, 28, 28] in [-1, 1] -> (features [B, 128], logits [B, 10])."""
        f = self.body(x)
        return f, self.head(f)


def train_classifier(images, labels, test_images, test_labels, epochs, seed, batch_size, lr,
                     features, device="cpu"):
    """Adam with a one-cycle learning rate and random 2-pixel shifts; returns (model, test
    accuracy)."""
    torch.manual_seed(seed)
    model = Classifier(features).to(device)
    steps_per_epoch = len(images) // batch_size
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr,
                                                total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc="training the evaluation classifier",
               disable=None)
    for _ in range(epochs):
        model.train()
        for idx in (torch.randperm(len(images), generator=g)[: steps_per_epoch * batch_size]
                    .view(-1, batch_size)):
            x = to_model_range(images[idx]).to(device)
            # the same shift for the whole batch
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, (dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x)[1], labels[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    _, logits = embed(model, to_model_range(test_images))
    return model.eval(), (logits.argmax(1) == test_labels).float().mean().item()


@torch.no_grad()
def embed(model, x, batch_size=500):
    """Features [N, 128] and logits [N, 10] of images [N, 1, 28, 28] in [-1, 1], on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return torch.cat([f for f, _ in out]).cpu(), torch.cat([lg for _, lg in out]).cpu()


def fingerprint(*tensors):
    """A short hash of the tensors' bytes: which data a classifier was trained and tested on."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_classifier(path, train_x, train_y, test_x, test_y, device, flag="--classifier-dir"):
    """The classifier cached at path if it was trained on this data with these settings, else a new
    one trained (about 5 minutes on 2 CPU cores) and cached; a damaged or stale cache is said and
    replaced. A cache is only read, so it may sit in a read-only folder; path's folder is proved
    writable (one line naming `flag` if not) before a new one is trained."""
    key = {"format": CLASSIFIER_FORMAT, "data": fingerprint(train_x, train_y, test_x, test_y),
           **CLASSIFIER_SETTINGS}
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                model = Classifier(CLASSIFIER_SETTINGS["features"])
                model.load_state_dict(saved["model"])
                return model.to(device).eval(), saved["test_accuracy"]
            print(f"{path} was trained on other data or settings; training a new one")
        except Exception as e:  # truncated, garbage, foreign: the cache is only a cache
            print(f"{path} is damaged ({first_line(e, 100)}); training a new one")
    check_writable(path.parent, flag)
    model, accuracy = train_classifier(train_x, train_y, test_x, test_y, device=device,
                                       **CLASSIFIER_SETTINGS)
    atomic_save({"key": key, "model": model.state_dict(), "test_accuracy": accuracy}, path)
    print(f"trained the evaluation classifier: test accuracy {accuracy:.2%}; cached in {path}")
    return model, accuracy


def frechet_distance(a, b):
    """FID between feature sets a [N, D] and b [M, D] as Gaussians (Heusel et al. 2017, eq. 6):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(s_a)
    root_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    # tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), which is symmetric:
    # eigenvalues are real
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross).item()


def kernel_inception_distance(a, b, subsets=50, subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / D + 1)^3, averaged over
    subsets."""
    a, b = a.double(), b.double()
    m = min(subset_size, len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    kernel = lambda x, y: (x @ y.T / a.shape[1] + 1) ** 3
    values = []
    for _ in range(subsets):
        x, y = (a[torch.randperm(len(a), generator=g)[:m]],
                b[torch.randperm(len(b), generator=g)[:m]])
        kxx, kyy = kernel(x, x), kernel(y, y)
        values.append((kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
                      - 2 * kernel(x, y).mean())
    return torch.stack(values).mean().item()


def _kth_neighbour_radius(x, k, chunk=1000):
    """Distance from each row of x to its k-th nearest other row: [N]."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), chunk)])


def _covered(points, centres, radii, chunk=1000):
    """For each point, whether it lies inside any ball (centre, radius): [N] bool."""
    return torch.cat([(torch.cdist(points[i:i + chunk], centres) <= radii).any(1)
                      for i in range(0, len(points), chunk)])


def precision_recall(real, fake, k=NEIGHBOURS):
    """Improved precision and recall, Kynkaanniemi et al. 2019: the share of fake samples inside the
    real k-NN manifold, and of real samples inside the fake one."""
    real, fake = real.float(), fake.float()
    precision = _covered(fake, real, _kth_neighbour_radius(real, k)).float().mean().item()
    recall = _covered(real, fake, _kth_neighbour_radius(fake, k)).float().mean().item()
    return precision, recall


def score(features, logits, reference, labels=None, reference_labels=None):
    """Every metric of one image set against the reference (test-set) features, as a dict. With the
    classes the images were asked for (labels): how often the classifier agrees, and FID per
    class."""
    precision, recall = precision_recall(reference, features)
    counts = torch.bincount(logits.argmax(1), minlength=10).tolist()
    result = {"fid": frechet_distance(features, reference),
              "kid": kernel_inception_distance(features, reference),
              "precision": precision, "recall": recall, "classes": dict(zip(CLASSES, counts))}
    if labels is not None:
        result["accuracy"] = (logits.argmax(1) == labels).float().mean().item()
        result["fid_per_class"] = {name: frechet_distance(features[labels == c],
                                                          reference[reference_labels == c])
                                   for c, name in enumerate(CLASSES) if (labels == c).sum() > 1}
    return result


def table_rows(rows, header=False):
    """evaluate.py's rows (score()'s dicts with a name, and NFE and images/s where drawn) as lines
    of a table, its header first if asked."""
    lines = [f"{'images':<26}{'NFE':>6}{'img/s':>9}{'FID':>9}{'KID x1e3':>10}{'prec.':>7}"
             f"{'recall':>7}{'cond.acc':>9}  fewest class"] if header else []
    for r in rows:
        rarest = min(r["classes"], key=r["classes"].get)
        share = r["classes"][rarest] / max(1, sum(r["classes"].values()))
        rate = f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "-"
        accuracy = f"{r['accuracy']:.1%}" if "accuracy" in r else "-"
        lines.append(f"{r['name']:<26}{r.get('nfe') or '-':>6}{rate:>9}{r['fid']:>9.2f}"
                     f"{1e3 * r['kid']:>10.2f}{r['precision']:>7.3f}{r['recall']:>7.3f}"
                     f"{accuracy:>9}  {rarest} {share:.1%}")
    return lines
